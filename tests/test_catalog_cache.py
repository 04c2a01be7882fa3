"""The parsed-YAML cache: same results as a fresh parse, invalidated by edits, never trusted blindly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pefref.language import catalog_cache
from pefref.language.errors import CatalogError
from pefref.language.limits import limits
from pefref.language.loader import load_file
from pefref.language.schema import Technique
from pefref.language.yamlsrc import parse_yaml, read_yaml

ROOT = Path(__file__).resolve().parents[1]
LORA = (ROOT / "catalog" / "techniques" / "lora.yaml").read_text(encoding="utf-8")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("PEFREF_CACHE_DIR", str(folder))
    monkeypatch.delenv("PEFREF_NO_CACHE", raising=False)
    return folder


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _same(a, b) -> None:
    assert a[0] == b[0]
    assert dict(a[1]) == dict(b[1]) and a[1].keys == b[1].keys and a[1].quoted == b[1].quoted and a[1].file == b[1].file


def test_second_read_comes_from_the_cache_and_equals_a_fresh_parse(cache, tmp_path):
    f = tmp_path / "lora.yaml"
    f.write_text(LORA, encoding="utf-8")
    first = read_yaml(f)
    assert len(_entries(cache)) == 1
    hit = catalog_cache.load(f.read_bytes(), str(f))
    assert hit is not None
    _same(hit, first)
    _same(read_yaml(f), parse_yaml(LORA, str(f)))


def test_positions_name_the_file_read_not_the_file_cached(cache, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(LORA, encoding="utf-8")
    b.write_text(LORA, encoding="utf-8")
    read_yaml(a)
    _data, pos = read_yaml(b)
    assert pos.file == str(b) and {loc.file for loc in pos.values()} == {str(b)}


def test_an_edit_misses_and_is_parsed_again(cache, tmp_path):
    f = tmp_path / "lora.yaml"
    f.write_text(LORA, encoding="utf-8")
    read_yaml(f)
    f.write_text(LORA.replace("name: LoRA", "name: LoRA edited", 1), encoding="utf-8")
    data, _ = read_yaml(f)
    assert data["name"] == "LoRA edited"
    assert len(_entries(cache)) == 2


def test_other_limits_miss(cache, tmp_path):
    f = tmp_path / "lora.yaml"
    f.write_text(LORA, encoding="utf-8")
    read_yaml(f)
    with limits(max_yaml_depth=3), pytest.raises(CatalogError, match="nested more than 3 levels"):
        read_yaml(f)


@pytest.mark.parametrize("damage", ["garbage", "checksum", "shape", "key"])
def test_a_damaged_entry_is_ignored_and_rewritten(cache, tmp_path, damage):
    f = tmp_path / "lora.yaml"
    f.write_text(LORA, encoding="utf-8")
    fresh = read_yaml(f)
    (entry,) = _entries(cache)
    head, _, payload = entry.read_bytes().partition(b"\n")
    if damage == "garbage":
        entry.write_bytes(b"\x00not json")
    elif damage == "checksum":  # valid JSON, altered data, old checksum
        entry.write_bytes(head + b"\n" + payload.replace(b'"LoRA"', b'"Evil"', 1))
    else:
        meta = json.loads(head)
        body = json.loads(payload)
        if damage == "shape":
            body["at"] = [[["id"], "one", 2]]
        else:
            meta["key"] = "0" * 64
        payload = json.dumps(body).encode()
        meta["sha256"] = __import__("hashlib").sha256(payload).hexdigest()
        entry.write_bytes(json.dumps(meta).encode() + b"\n" + payload)
    assert catalog_cache.load(f.read_bytes(), str(f)) is None
    _same(read_yaml(f), fresh)
    _same(catalog_cache.load(f.read_bytes(), str(f)), fresh)  # rewritten


def test_errors_are_located_with_a_warm_cache_and_never_cached(cache, tmp_path):
    bad = tmp_path / "lora.yaml"
    bad.write_text(LORA.replace("modules:", "modulez: 1\nmodules:", 1), encoding="utf-8")
    reports = []
    for _ in range(2):
        with pytest.raises(CatalogError) as e:
            load_file(Technique, bad)
        reports.append([str(p) for p in e.value.problems])
    assert reports[0] == reports[1]
    line = LORA[: LORA.index("modules:")].count("\n") + 1
    assert any(r.startswith(f"{bad}:{line}:1: modulez: unknown key") for r in reports[1]), reports[1]
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("id: [unclosed\n", encoding="utf-8")
    n = len(_entries(cache))
    for _ in range(2):
        with pytest.raises(CatalogError, match=r"syntax.yaml:\d+:\d+: YAML syntax error"):
            read_yaml(syntax)
    assert len(_entries(cache)) == n


def test_off_switch_and_unwritable_folder(tmp_path, monkeypatch):
    f = tmp_path / "lora.yaml"
    f.write_text(LORA, encoding="utf-8")
    monkeypatch.setenv("PEFREF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PEFREF_NO_CACHE", "1")
    read_yaml(f)
    assert not (tmp_path / "cache").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PEFREF_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.delenv("PEFREF_NO_CACHE")
    _same(read_yaml(f), parse_yaml(LORA, str(f)))


def test_integer_keys_are_not_cached(cache, tmp_path):
    f = tmp_path / "ints.yaml"
    f.write_text("a: {1: x}\n", encoding="utf-8")
    data, _ = read_yaml(f)
    assert data == {"a": {1: "x"}} and _entries(cache) == []


def test_old_entries_are_pruned(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(catalog_cache, "MAX_ENTRIES", 3)
    for i in range(5):
        f = tmp_path / f"f{i}.yaml"
        f.write_text(f"id: t{i}\n", encoding="utf-8")
        read_yaml(f)
    assert len(_entries(cache)) == 3


def test_memo_keeps_a_result_across_calls_and_recomputes_a_damaged_one(cache):
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"flops": 12, "name": "x"}

    assert catalog_cache.memo("t", {"k": [1, 2]}, compute) == {"flops": 12, "name": "x"}
    assert catalog_cache.memo("t", {"k": [1, 2]}, compute) == {"flops": 12, "name": "x"}
    assert len(calls) == 1
    assert catalog_cache.memo("t", {"k": [1, 3]}, compute) and len(calls) == 2  # another key
    for entry in (cache.parent / "derived").glob("*.json"):
        entry.write_bytes(b"{}\n[]")
    assert catalog_cache.memo("t", {"k": [1, 2]}, compute) == {"flops": 12, "name": "x"} and len(calls) == 3


def test_derived_facts_are_the_same_from_the_memo(cache, catalog, monkeypatch):
    from pefref.view import derived_facts

    t, shape = catalog.technique("lora"), catalog.shape("llama-2-7b")
    first = derived_facts(t, catalog, shape, {"r": 4})
    assert list((cache.parent / "derived").glob("*.json"))
    again = derived_facts(t, catalog, shape, {"r": 4})
    monkeypatch.setenv("PEFREF_NO_CACHE", "1")
    fresh = derived_facts(t, catalog, shape, {"r": 4})
    assert first == again == fresh
    assert first["efficiency"]["extra_flops_per_token"] > 0
