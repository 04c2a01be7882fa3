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
    assert not hasattr(model, "pefref_adapters") or not getattr(model, "pefref_adapters")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_own_adapter_file_is_refused(tmp_path: Path) -> None:
    model = build_model("tiny-llama", seed=0)
    a = pefref.apply(model, "lora")
    a.save(tmp_path / "a.safetensors")
    a.remove()
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

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
    assert "composition" not in getattr(model, "pefref_adapters")
    assert all(e.group is None for ad in ads for _p, e in ad.entries)
