"""Fuzzing the newer surfaces: experiment files and their data, compositions from Python, results folders and
peft adapter folders. Property: every exception that reaches a user is a PefrefError (located: it names the
file or the block), and a failure changes nothing (the model computes as before, the files keep their bytes).

Examples are derandomised and bounded, so the suite never flakes."""

from __future__ import annotations

import functools
import json
import sqlite3
import warnings
from pathlib import Path

import peft
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

import pefref
from pefref.experiments.records import Records
from pefref.experiments.results import load_results
from pefref.language.datafile import check_data
from pefref.language.errors import PefrefError
from pefref.language.experiment_file import load_experiment
from pefref.models.build import build_model
from pefref.runtime.compose import compose

from .test_experiments import write_exp
from .test_fuzz_inputs import _mutations, _settings

# --- experiment files and data ------------------------------------------------------------------


@_settings(40)
@given(data=st.data())
def test_mutated_experiment_files_give_pefref_errors(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    folder = tmp_path_factory.mktemp("exp")
    base = write_exp(folder, "  - technique: lora\n    hyperparameters: {r: [2, 4]}\n  - baseline: head_only")
    tree = yaml.safe_load(base.read_text())
    mutated = _mutations(tree, data.draw)
    try:
        base.write_text(yaml.safe_dump(mutated, sort_keys=False, allow_unicode=True))
    except yaml.YAMLError:
        return
    try:
        load_experiment(base)
    except PefrefError as e:
        assert str(base) in str(e) or "data." in str(e), str(e)


LINES = st.sampled_from([
    '{"text": "a fine film", "label": "positive"}', '{"text": "dull", "label": "negative"}', '{"text": "x"}', '{"label": "a"}',
    '{"text": null, "label": "a"}', '{"text": "x", "label": 3}', '{"text": "x", "label": [1]}', "[1, 2]", "{", "", "null",
    '{"text": "\\u0000\\u001b", "label": "\\u202e"}', '{"text": "x", "label": ""}',
])


@_settings(60)
@given(lines=st.lists(LINES, max_size=6), junk=st.binary(max_size=8), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_data_files_give_located_errors(tmp_path_factory: pytest.TempPathFactory, lines: list[str], junk: bytes, suffix: str) -> None:
    f = tmp_path_factory.mktemp("data") / f"train{suffix}"
    f.write_bytes("\n".join(lines).encode("utf-8") + junk)
    try:
        rows = check_data(f, "text", "label")
    except PefrefError as e:
        assert str(f) in str(e), str(e)
        return
    assert len({str(r.values["label"]) for r in rows}) >= 2 and all(r.values["label"] not in (None, "") for r in rows)


# --- compositions ---------------------------------------------------------------------------------


@functools.cache
def _composed() -> tuple[torch.nn.Module, list[pefref.Adapter], torch.Tensor, torch.Tensor]:
    model = build_model("tiny-llama", seed=0)
    torch.manual_seed(0)
    ads = [pefref.apply(model, t, name=n) for n, t in (("a", "lora"), ("b", "lora"), ("d", "dora"), ("i", "ia3"))]
    with torch.no_grad():
        for ad in ads:
            for p in ad.trainable_parameters():
                p.add_(0.2 * torch.randn_like(p))
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, ads, ids, model(input_ids=ids).logits


BLOCK = st.fixed_dictionaries(
    {"kind": st.sampled_from(["stack", "parallel", "average", "fusion", "nope", 3]),
     "adapters": st.lists(st.sampled_from(["a", "b", "d", "i", "absent", ""]), max_size=3)},
    optional={"weights": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
              "sites": st.lists(st.sampled_from(["attn.q", "attn.v", "ffn.down", "nowhere", "*"]), max_size=2),
              "temperature": st.floats(allow_nan=True, allow_infinity=True), "extra": st.integers()})


@_settings(40)
@given(blocks=st.lists(st.one_of(BLOCK, st.sampled_from(["x", None, 1])), min_size=1, max_size=3))
def test_compositions_are_transactions(blocks: list[object]) -> None:
    model, ads, ids, before = _composed()
    try:
        comp = compose(model, ads, blocks=blocks)  # type: ignore[arg-type]
    except PefrefError as e:
        assert str(e)
    else:
        comp.undo_blocks()  # a composition that succeeded: taken out again, as remove() would
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert "composition" not in model.pefref_adapters
    assert all(e.group is None for ad in ads for _p, e in ad.entries)


# --- results folders --------------------------------------------------------------------------------


@functools.cache
def _results_bytes(folder: Path) -> bytes:
    rec = Records(folder)
    rec.upsert("r1", experiment="e", label="lora", technique="lora", seed=0, lr=1e-3, config={"x": 1}, status="done",
               final_metrics={"accuracy": 0.5}, main_metric="accuracy")
    rec.log("r1", 1, "train", {"loss": 0.7})
    rec.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rec.close()
    for extra in ("results.sqlite-wal", "results.sqlite-shm"):
        (folder / extra).unlink(missing_ok=True)
    return (folder / "results.sqlite").read_bytes()


@_settings(40)
@given(cut=st.integers(0, 1 << 16), flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4),
       foreign=st.booleans())
def test_results_folders_give_pefref_errors_and_stay_unchanged(tmp_path_factory: pytest.TempPathFactory, cut: int,
                                                                flips: list[tuple[int, int]], foreign: bool) -> None:
    good = _results_bytes(tmp_path_factory.getbasetemp() / "results-source") if (tmp_path_factory.getbasetemp() / "results-source").mkdir(exist_ok=True) is None else b""
    folder = tmp_path_factory.mktemp("res")
    db = folder / "results.sqlite"
    if foreign:
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE t (x)")
        con.commit()
        con.close()
        raw = db.read_bytes()
    else:
        raw = bytearray(good[: max(cut, 1)] if cut < len(good) else good)
        for at, v in flips:
            if at < len(raw):
                raw[at] = v
        raw = bytes(raw)
        db.write_bytes(raw)
    try:
        res = load_results(folder)
    except PefrefError as e:
        assert str(db) in str(e), str(e)
    else:
        assert all(r.id for r in res.runs)
    assert db.read_bytes() == raw and sorted(p.name for p in folder.iterdir()) == ["results.sqlite"]


# --- peft adapter folders ---------------------------------------------------------------------------


@functools.cache
def _peft_source(folder: Path) -> tuple[str, bytes]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build_model("tiny-llama", seed=0), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        pm.save_pretrained(folder)
    return (folder / "adapter_config.json").read_text(), (folder / "adapter_model.safetensors").read_bytes()


CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True),
                          st.text(max_size=12), st.lists(st.sampled_from(["q_proj", "v_proj", "nowhere", ""]), max_size=3),
                          st.dictionaries(st.text(max_size=5), st.integers(0, 9), max_size=2))


@_settings(40)
@given(data=st.data())
def test_peft_folders_give_pefref_errors_and_change_nothing(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    src = tmp_path_factory.getbasetemp() / "peft-source"
    src.mkdir(exist_ok=True)
    cfg_text, weights = _peft_source(src)
    folder = tmp_path_factory.mktemp("peft")
    cfg = json.loads(cfg_text)
    key = data.draw(st.sampled_from(sorted(cfg) + ["peft_type", "r", "lora_alpha", "target_modules", "layers_to_transform"]))
    if data.draw(st.booleans()):
        cfg[key] = data.draw(CONFIG_VALUES)
    else:
        cfg.pop(key, None)
    raw = bytearray(weights)
    for at, v in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=3)):
        raw[at] = v
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "adapter_model.safetensors").write_bytes(bytes(raw[:cut]))
    model = build_model("tiny-llama", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ad = pefref.from_pretrained(model, folder)
    except PefrefError as e:
        assert str(e)
        assert not getattr(model, "pefref_adapters", None)
        assert model.state_dict().keys() == before.keys() and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    else:
        assert all(bool(torch.isfinite(p).all()) for p in ad.state_dict().values() if p.is_floating_point())
        ad.remove()
