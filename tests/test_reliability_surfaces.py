"""The newer surfaces (site builder, peft adapter folders, experiments' results, compositions, sizes, terminal
output) hold the adapter API's guarantees: a located pefref error, nothing changed after a failure."""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import peft
import pytest
import torch

import pefref
from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.render.site.build import MANIFEST, build_site
from pefref.runtime.compose import compose

CATALOG = default_catalog()


def _small_catalog():  # type: ignore[no-untyped-def]
    return replace(CATALOG, techniques={"lora": CATALOG.techniques["lora"]})


def test_site_deletes_only_its_own_files(tmp_path: Path) -> None:
    """A manifest naming an absolute path, a path out through '..' or through a link: none is deleted."""
    out, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    victims = [elsewhere / "abs.txt", elsewhere / "up.txt", elsewhere / "linked.txt"]
    for v in victims:
        v.write_text("keep me")
    build_site(out, catalog=_small_catalog())
    (out / "out").symlink_to(elsewhere)
    (out / MANIFEST).write_text(f"{victims[0]}\n../elsewhere/up.txt\nout/linked.txt\n", encoding="utf-8")
    _written, removed = build_site(out, catalog=_small_catalog())
    assert removed == []
    assert all(v.read_text() == "keep me" for v in victims)


def test_site_refuses_to_write_through_a_link(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "techniques").symlink_to(elsewhere)
    with pytest.raises(PefrefError, match="link"):
        build_site(out, catalog=_small_catalog())
    assert list(elsewhere.iterdir()) == []


def _peft_folder(tmp_path: Path, poison: float | None) -> Path:
    base = build_model("tiny-llama", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    if poison is not None:
        with torch.no_grad():
            next(p for p in pm.parameters() if p.requires_grad).view(-1)[0] = poison
    pm.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_peft_adapter_is_refused(tmp_path: Path, poison: float) -> None:
    folder = _peft_folder(tmp_path, poison)
    model = build_model("tiny-llama", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PefrefError, match="NaN or infinite"):
        pefref.from_pretrained(model, folder)
    assert not hasattr(model, "pefref_adapters") or not model.pefref_adapters
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_own_adapter_file_is_refused(tmp_path: Path) -> None:
    model = build_model("tiny-llama", seed=0)
    a = pefref.apply(model, "lora")
    a.save(tmp_path / "a.safetensors")
    a.remove()
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    state = load_file(str(tmp_path / "a.safetensors"))
    k = sorted(state)[0]
    state[k].view(-1)[0] = float("nan")
    save_file(state, str(tmp_path / "a.safetensors"), metadata=meta)
    with pytest.raises(PefrefError, match="NaN or infinite"):
        pefref.from_pretrained(model, tmp_path / "a.safetensors")
    assert not getattr(model, "pefref_adapters", None)


@pytest.mark.parametrize("damage", ["config-not-json", "config-list", "weights-truncated", "weights-absent"])
def test_damaged_peft_folder_is_a_pefref_error(tmp_path: Path, damage: str) -> None:
    folder = _peft_folder(tmp_path, None)
    cfg, w = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if damage == "config-not-json":
        cfg.write_bytes(b"\xff{not json")
    elif damage == "config-list":
        cfg.write_text(json.dumps([1, 2]))
    elif damage == "weights-truncated":
        w.write_bytes(w.read_bytes()[:50])
    else:
        os.remove(w)
    model = build_model("tiny-llama", seed=0)
    with pytest.raises(PefrefError, match=str(folder)):
        pefref.from_pretrained(model, folder)


def _llama_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bad", [
    {"kind": "parallel", "adapters": ["a", "absent"]},  # an absent adapter (was a bare KeyError)
    {"kind": "parallel", "adapters": ["a", "d"]},  # a stage-order violation (LoRA and DoRA run in different stages)
    {"kind": "no-such-kind", "adapters": ["a", "b"]},  # a malformed block
    "not a block",
])
def test_compose_is_a_transaction(bad: object) -> None:
    """A later invalid block takes out the earlier ones: the model computes what it did before compose()."""
    model = build_model("tiny-llama", seed=0)
    torch.manual_seed(0)
    ads = [pefref.apply(model, "lora", name=n) for n in ("a", "b")] + [pefref.apply(model, "dora", name="d")]
    with torch.no_grad():
        for ad in ads:
            for p in ad.trainable_parameters():
                p.add_(0.3 * torch.randn_like(p))
    before = _llama_logits(model)
    with pytest.raises(PefrefError):
        compose(model, ads, blocks=[{"kind": "average", "adapters": ["a", "b"], "weights": [0.2, 0.8]}, bad])  # type: ignore[list-item]
    assert torch.equal(_llama_logits(model), before)
    assert "composition" not in model.pefref_adapters
    assert all(e.group is None for ad in ads for _p, e in ad.entries)


HOSTILE = "Lo\x1b[2J\x1b]0;pwned\x07RA\r\u202eevil\x9b"


def _hostile_yaml(tmp_path: Path) -> Path:
    src = (Path(__file__).parent.parent / "catalog" / "techniques" / "lora.yaml").read_text(encoding="utf-8")
    p = tmp_path / "hostile.yaml"
    name = json.dumps(HOSTILE)  # a YAML double-quoted scalar with \\x1b, \\u202e... escapes
    p.write_text(src.replace("name: LoRA", f"name: {name}").replace("id: lora", "id: hostile"), encoding="utf-8")
    return p


def _raw_controls(s: str) -> list[str]:
    return [c for c in s if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F or c == "\u202e"]


def test_control_characters_never_reach_the_terminal(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pefref.cli.app import app

    res = CliRunner().invoke(app, ["show", str(_hostile_yaml(tmp_path))], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "\\x1b[2J" in res.output and "\\u202e" in res.output
    assert _raw_controls(res.output) == []


def test_safe_console_keeps_its_own_styles() -> None:
    import io

    from rich.text import Text

    from pefref.cli.safe import SafeConsole

    buf = io.StringIO()
    SafeConsole(file=buf, force_terminal=True, color_system="standard", width=200).print(Text(HOSTILE, style="bold red"))
    out = buf.getvalue()
    assert "\\x1b]0;pwned" in out and "\\x9b" in out  # (rich drops BEL and CR itself)
    assert out.count("\x1b[") >= 1  # rich's own style codes stay
    assert "\x1b[2J" not in out and "\x07" not in out and "\u202e" not in out


def test_control_characters_never_reach_the_site(tmp_path: Path) -> None:
    from pefref.render.site.build import site_files, with_included

    folder = tmp_path / "inc"
    folder.mkdir()
    _hostile_yaml(folder)
    cat, _ids = with_included(_small_catalog(), [folder])
    files = site_files(cat)
    page = files["techniques/hostile.html"].decode("utf-8")
    assert "\\x1b[2J" in page
    for rel, content in files.items():
        if rel.endswith((".html", ".svg", ".json")):
            assert _raw_controls(content.decode("utf-8")) == [], rel


def _cli(*args: str) -> tuple[int, str, BaseException | None]:
    from typer.testing import CliRunner

    from pefref.cli.app import app

    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output, res.exception


def test_diagram_layers_are_bounded(tmp_path: Path) -> None:
    code, out, exc = _cli("diagram", "lora", "--layers", "100000", "--format", "dot", "-o", str(tmp_path / "d.dot"))
    assert code == 1 and "--layers 100000" in out and isinstance(exc, SystemExit), (out, exc)  # a pefref error, no traceback
    assert not (tmp_path / "d.dot").exists()


def test_params_and_apply_agree_on_empty_sites() -> None:
    """`--sites ''` places nothing: params refuses it as apply does, instead of counting the default placement."""
    p_code, p_out, _ = _cli("params", "lora", "--model", "tiny-llama", "--sites", "")
    a_code, a_out, _ = _cli("apply", "lora", "--model", "tiny-llama", "--sites", "")
    assert p_code != 0 and a_code != 0, (p_out, a_out)
    assert "nothing of lora is placed" in p_out and "nothing of lora is placed" in a_out


def test_jobs_are_bounded(tmp_path: Path) -> None:
    code, out, _ = _cli("run", str(tmp_path / "x.yaml"), "-j", "100000")
    assert code == 2 and "256" in out  # typer's usage error


def test_a_failing_combine_takes_out_its_own_changes() -> None:
    """Composition.combine from Python: a block that fails half-way leaves the earlier blocks as they were."""
    model = build_model("tiny-llama", seed=0)
    torch.manual_seed(0)
    ads = [pefref.apply(model, "lora", name=n) for n in ("a", "b")]
    with torch.no_grad():
        for ad in ads:
            for p in ad.trainable_parameters():
                p.add_(0.3 * torch.randn_like(p))
    comp = compose(model, ads, blocks=[{"kind": "average", "adapters": ["a", "b"], "weights": [0.2, 0.8]}])
    before = _llama_logits(model)
    groups = [e.group for ad in ads for _p, e in ad.entries]

    real, calls = comp._combiner, []

    def boom(*a: object, **k: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(*a, **k)  # type: ignore[arg-type]

    comp._combiner = boom  # type: ignore[method-assign]  # fails at the third host, two already grouped
    with pytest.raises(RuntimeError, match="injected"):
        comp.combine({"kind": "parallel", "adapters": ["a", "b"]})
    assert len(calls) == 3
    assert [e.group for ad in ads for _p, e in ad.entries] == groups
    assert torch.equal(_llama_logits(model), before)
