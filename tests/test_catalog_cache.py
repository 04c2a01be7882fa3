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


# --- the checked-catalog cache -------------------------------------------------------------------


def _small_catalog(tmp_path: Path) -> Path:
    """A copy of the bundled catalog's reference, maps, shapes and a few techniques."""
    import shutil

    root = tmp_path / "catalog"
    for sub in ("reference", "families"):
        shutil.copytree(ROOT / "catalog" / sub, root / sub)
    shutil.copy(ROOT / "catalog" / "models.yaml", root / "models.yaml")
    (root / "techniques").mkdir()
    for tid in ("lora", "ia3", "prefix_tuning"):
        shutil.copy(ROOT / "catalog" / "techniques" / f"{tid}.yaml", root / "techniques" / f"{tid}.yaml")
    return root


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The ids of the techniques checked (the cross-file checks a marker skips)."""
    from pefref.language import catalog

    seen: list[str] = []
    real = catalog.check_technique

    def check(t, *args):
        seen.append(t.id)
        return real(t, *args)

    monkeypatch.setattr(catalog, "check_technique", check)
    return seen


def _markers(cache: Path) -> list[Path]:
    return sorted((cache.parent / "checked").glob("*.json"))


def test_a_checked_catalog_is_not_checked_again_and_loads_the_same(cache, tmp_path, counted, monkeypatch):
    from pefref.language.catalog import load_catalog

    root = _small_catalog(tmp_path)
    first = load_catalog(root)
    assert sorted(counted) == ["ia3", "lora", "prefix_tuning"] and len(_markers(cache)) == 1
    counted.clear()
    again = load_catalog(root)
    assert counted == []  # the marker was trusted
    monkeypatch.setenv("PEFREF_NO_CACHE", "1")
    fresh = load_catalog(root)
    assert counted == ["ia3", "lora", "prefix_tuning"]
    for cat in (again, fresh):
        assert cat.techniques == first.techniques and cat.families == first.families and cat.shapes == first.shapes
        assert cat.reference == first.reference and cat.sources == first.sources
        assert {k: dict(v) for k, v in cat.positions.items()} == {k: dict(v) for k, v in first.positions.items()}


def test_an_edited_file_is_checked_again(cache, tmp_path, counted):
    from pefref.language.catalog import load_catalog

    root = _small_catalog(tmp_path)
    load_catalog(root)
    lora = root / "techniques" / "lora.yaml"
    lora.write_text(lora.read_text(encoding="utf-8").replace("linear(linear(dropout(x, dropout), A), B)", "linear(linear(dropout(x, dropout), A), Q)"), encoding="utf-8")
    counted.clear()
    with pytest.raises(CatalogError, match="Q"):
        load_catalog(root)  # the schema accepts it; only the checks find the unknown name
    assert "lora" in counted and len(_markers(cache)) == 1  # a catalog with problems is never marked
    with pytest.raises(CatalogError, match="Q"):
        load_catalog(root)
    family = sorted((root / "families").glob("*.yaml"))[0]
    lora.write_text((ROOT / "catalog" / "techniques" / "lora.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    family.write_text(family.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    counted.clear()
    load_catalog(root)
    assert sorted(counted) == ["ia3", "lora", "prefix_tuning"] and len(_markers(cache)) == 2


@pytest.mark.parametrize("damage", ["garbage", "checksum", "key", "deleted"])
def test_a_damaged_marker_is_ignored_and_rewritten(cache, tmp_path, counted, damage):
    from pefref.language.catalog import load_catalog

    root = _small_catalog(tmp_path)
    load_catalog(root)
    (marker,) = _markers(cache)
    head, _, payload = marker.read_bytes().partition(b"\n")
    if damage == "garbage":
        marker.write_bytes(b"\x00not json")
    elif damage == "checksum":
        marker.write_bytes(head + b"\n" + payload + b" ")
    elif damage == "key":
        marker.write_bytes(head.replace(marker.stem.encode(), b"0" * 64) + b"\n" + payload)
    else:
        import shutil

        shutil.rmtree(cache.parent / "checked")
    counted.clear()
    load_catalog(root)
    assert sorted(counted) == ["ia3", "lora", "prefix_tuning"]  # checked again
    counted.clear()
    load_catalog(root)
    assert counted == [] and _markers(cache) == [marker]  # rewritten, then trusted


def test_a_marker_of_another_pefref_is_not_trusted(cache, tmp_path, counted, monkeypatch):
    from pefref.language.catalog import load_catalog

    root = _small_catalog(tmp_path)
    load_catalog(root)
    monkeypatch.setattr(catalog_cache, "_package_digest", lambda: b"another pefref")
    counted.clear()
    load_catalog(root)
    assert sorted(counted) == ["ia3", "lora", "prefix_tuning"]


@pytest.fixture
def user_catalog(cache, tmp_path, monkeypatch) -> Path:
    """A user's catalog (one technique, a renamed LoRA) added to the bundled one; in-process catalogs forgotten."""
    from pefref.language.catalog import _cached, _cached_for

    folder = tmp_path / "mine"
    (folder / "techniques").mkdir(parents=True)
    (folder / "techniques" / "my_lora.yaml").write_text(LORA.replace("id: lora", "id: my_lora", 1).replace("name: LoRA", "name: Mine", 1), encoding="utf-8")
    monkeypatch.setenv("PEFREF_CATALOG", str(folder))
    for c in (_cached, _cached_for):
        c.cache_clear()
    yield folder
    for c in (_cached, _cached_for):
        c.cache_clear()


def test_results_over_the_catalog_are_kept_until_a_file_changes(user_catalog, monkeypatch):
    from pefref.language.catalog import _cached, default_catalog
    from pefref.language.catalog_memo import over_catalog

    calls: list[int] = []

    def names() -> dict[str, str]:
        calls.append(1)
        return {k: t.name for k, t in sorted(default_catalog().techniques.items())}

    first = over_catalog("test", {"a": 1}, names)
    assert first["my_lora"] == "Mine" and over_catalog("test", {"a": 1}, names) == first and len(calls) == 1
    assert over_catalog("test", {"a": 2}, names) == first and len(calls) == 2  # other arguments: computed
    monkeypatch.setenv("PEFREF_NO_CACHE", "1")
    assert over_catalog("test", {"a": 1}, names) == first and len(calls) == 3  # without the cache: the same
    monkeypatch.delenv("PEFREF_NO_CACHE")
    mine = user_catalog / "techniques" / "my_lora.yaml"
    mine.write_text(mine.read_text(encoding="utf-8").replace("name: Mine", "name: Edited", 1), encoding="utf-8")
    _cached.cache_clear()
    assert over_catalog("test", {"a": 1}, names)["my_lora"] == "Edited" and len(calls) == 4
    (user_catalog / "techniques" / "other.yaml").write_text(LORA.replace("id: lora", "id: other", 1), encoding="utf-8")
    _cached.cache_clear()
    assert "other" in over_catalog("test", {"a": 1}, names) and len(calls) == 5  # an added file


def test_a_broken_file_is_reported_not_hidden_by_a_kept_result(user_catalog, monkeypatch):
    from pefref.language.catalog import _cached, default_catalog
    from pefref.language.catalog_memo import over_catalog

    def count() -> int:
        return len(default_catalog().techniques)

    n = over_catalog("test", None, count)
    mine = user_catalog / "techniques" / "my_lora.yaml"
    mine.write_text(mine.read_text(encoding="utf-8").replace("A), B)", "A), Q)", 1), encoding="utf-8")
    _cached.cache_clear()
    with pytest.raises(CatalogError, match="Q"):
        over_catalog("test", None, count)
    assert n > 1


def test_the_cli_prints_the_same_from_a_kept_result(user_catalog, monkeypatch):
    from typer.testing import CliRunner

    from pefref.cli.app import app

    runner = CliRunner()
    for args in (["list", "--json"], ["show", "my_lora", "--json"], ["params", "my_lora", "--model", "gpt2", "--json"], ["params", "lora", "--model", "gpt2"]):
        monkeypatch.setenv("PEFREF_NO_CACHE", "1")
        fresh = runner.invoke(app, args)
        monkeypatch.delenv("PEFREF_NO_CACHE")
        first, kept = runner.invoke(app, args), runner.invoke(app, args)
        assert fresh.exit_code == 0, fresh.output
        assert fresh.output == first.output == kept.output, args
    assert list((user_catalog.parent / "cache").parent.glob("derived/*.json"))


def _kept(cache: Path) -> list[Path]:
    return [p for p in sorted((cache.parent / "derived").glob("*.json"))]


def _catalog_files() -> list[tuple[type, Path]]:
    from pefref.language.schema import ArchitectureMap, ModelShapes, ReferenceArchitecture

    return ([(Technique, p) for p in sorted((ROOT / "catalog" / "techniques").glob("*.yaml"))]
            + [(ArchitectureMap, p) for p in sorted((ROOT / "catalog" / "families").glob("*.yaml"))]
            + [(ReferenceArchitecture, ROOT / "catalog" / "reference" / "transformer.yaml"), (ModelShapes, ROOT / "catalog" / "models.yaml")])


def _identical(a, b) -> None:
    """Same types all the way down, same values, same fields set."""
    from pydantic import BaseModel

    assert type(a) is type(b)
    if isinstance(a, BaseModel):
        assert a.model_fields_set == b.model_fields_set and a.__dict__.keys() == b.__dict__.keys()
        for k in a.__dict__:
            _identical(a.__dict__[k], b.__dict__[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _identical(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _identical(a[k], b[k])
    else:
        assert a == b


def test_kept_objects_are_the_validated_ones_for_every_catalog_file(cache):
    """A second load of every catalog file builds its objects from the kept validation (no validator runs), identical
    to the validated ones in types, values and fields set."""
    from unittest import mock

    from pydantic import BaseModel

    from pefref.language import loader

    for cls, path in _catalog_files():
        first = load_file(cls, path)[0]
        with mock.patch.object(loader, "validate_data", side_effect=AssertionError("validated again")):
            again = load_file(cls, path)[0]
        _identical(first, again)
        assert first == again and again.model_dump() == first.model_dump()
        assert isinstance(again, BaseModel)


def test_a_kept_object_naming_a_foreign_class_or_damaged_is_validated_again(cache, tmp_path):
    from pefref.language.kept_objects import decode, encode

    f = tmp_path / "lora.yaml"
    f.write_text(LORA, encoding="utf-8")
    first = load_file(Technique, f)[0]
    (entry,) = [p for p in _kept(cache) if b'"m":"pefref.language.schema.technique:Technique"' in p.read_bytes()]
    head, _, payload = entry.read_bytes().partition(b"\n")
    forged = payload.replace(b"pefref.language.schema.technique:Technique", b"builtins:object")
    meta = json.loads(head)
    import hashlib

    meta["sha256"] = hashlib.sha256(forged).hexdigest()
    entry.write_bytes(json.dumps(meta).encode() + b"\n" + forged)
    with pytest.raises(ValueError):
        decode(json.loads(forged))
    assert load_file(Technique, f)[0] == first  # validated again
    entry.write_bytes(head + b"\n" + payload[:-5])  # checksum no longer matches
    assert load_file(Technique, f)[0] == first
    assert decode(encode(first)) == first


def test_a_file_that_fails_validation_is_never_kept(cache, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(LORA.replace("id: lora", "id: lora\nnot_a_field: 1", 1), encoding="utf-8")
    for _ in range(2):
        with pytest.raises(CatalogError, match="not_a_field"):
            load_file(Technique, f)
    assert not [p for p in _kept(cache) if b"not_a_field" in p.read_bytes()]
