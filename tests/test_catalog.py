"""The bundled catalog: every file validates, round-trips, and carries its schema line; the kitchen sink covers the schema."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.catalog import catalog_root, default_catalog, load_catalog, load_techniques
from pefref.language.loader import validate_data
from pefref.language.schema import FORMS, SCHEMAS, LayerRange, ModuleUse, Technique
from pefref.language.schema import technique as technique_schema
from pefref.language.yamlsrc import parse_yaml

ROOT = catalog_root()
FIXTURES = Path(__file__).parent / "fixtures"
KITCHEN_SINK = FIXTURES / "kitchen_sink.yaml"
TECHNIQUE_FILES = sorted((ROOT / "techniques").glob("*.yaml"))
PEFT_REF_IDS = {"prompt_tuning", "prefix_tuning", "lora", "houlsby_adapter", "tiny_attention_adapter", "compacter", "ia3"}
SCHEMA_LINE = "# yaml-language-server: $schema="

# which generated schema each catalog file is written against
CATALOG_FILES = [
    *[(p, "technique") for p in TECHNIQUE_FILES],
    *[(p, "family") for p in sorted((ROOT / "families").glob("*.yaml"))],
    (ROOT / "reference" / "transformer.yaml", "reference"),
    (ROOT / "models.yaml", "models"),
]


def _ids(files: list[Path]) -> list[str]:
    return [p.stem for p in files]


def test_catalog_loads() -> None:
    cat = load_catalog()
    assert set(cat.techniques) == {p.stem for p in TECHNIQUE_FILES}
    assert {p.stem for p in (ROOT / "families").glob("*.yaml")} == set(cat.families)
    assert cat.shapes and cat.reference.sites


def test_peft_ref_ids_present_and_snake_case() -> None:
    ids = {p.stem for p in TECHNIQUE_FILES}
    assert ids >= PEFT_REF_IDS
    for tid in ids:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", tid), tid
        assert default_catalog().techniques[tid].id == tid


@pytest.mark.parametrize(("path", "kind"), CATALOG_FILES, ids=[f"{k}:{p.stem}" for p, k in CATALOG_FILES])
def test_schema_line(path: Path, kind: str) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(SCHEMA_LINE), f"{path} must start with {SCHEMA_LINE!r}"
    target = (path.parent / first[len(SCHEMA_LINE):].strip()).resolve()
    assert target.name == f"{kind}.schema.json"
    assert target.is_file(), f"{path}: {target} does not exist"


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _round_trip(obj: BaseModel) -> None:
    """dump → validate gives an equal object, and so does dump → YAML text → pefref's loader."""
    cls = type(obj)
    data = obj.model_dump(mode="json", by_alias=True, exclude_defaults=False)
    assert cls.model_validate(data) == obj
    text = yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True)
    again, pos = parse_yaml(text, f"<{cls.__name__}>")
    assert validate_data(cls, again, pos) == obj


@pytest.mark.parametrize("tid", _ids(TECHNIQUE_FILES))
def test_technique_round_trips(tid: str) -> None:
    _round_trip(default_catalog().techniques[tid])


def test_other_files_round_trip() -> None:
    cat = default_catalog()
    _round_trip(cat.reference)
    for fam in cat.families.values():
        _round_trip(fam)
    for shape in cat.shapes.values():
        _round_trip(shape)


def test_schema_check_passes() -> None:
    result = CliRunner().invoke(app, ["schema", "--check"])
    assert result.exit_code == 0, result.output


def test_schema_files_are_the_registry() -> None:
    schemas = Path(__file__).resolve().parent.parent / "schemas"
    assert {p.name for p in schemas.glob("*.schema.json")} == {f"{k}.schema.json" for k in SCHEMAS}


# --- the kitchen sink -----------------------------------------------------------


def _kitchen_sink() -> Technique:
    cat = default_catalog()
    loaded, _src, _pos, problems = load_techniques([KITCHEN_SINK], cat.reference, cat.techniques)
    assert not problems, "\n".join(map(str, problems))
    return loaded["kitchen_sink"]


def _declaring(cls: type, name: str) -> type:
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def _fields_set(obj: Any, out: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """(declaring class, field) for every field written explicitly anywhere in ``obj``."""
    if isinstance(obj, BaseModel):
        for name in obj.model_fields_set:
            out.add((_declaring(type(obj), name).__name__, name))
            _fields_set(getattr(obj, name), out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _fields_set(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _fields_set(v, out)
    return out


def test_kitchen_sink_validates() -> None:
    assert KITCHEN_SINK.read_text(encoding="utf-8").startswith(SCHEMA_LINE + "../../schemas/technique.schema.json")
    t = _kitchen_sink()
    _round_trip(t)


def test_kitchen_sink_sets_every_field_of_the_technique_schema() -> None:
    """A drift guard: a field added to the technique schema must be exercised here."""
    models = [getattr(technique_schema, n) for n in technique_schema.__all__]
    models = [m for m in models if isinstance(m, type) and issubclass(m, BaseModel)]
    wanted = {(_declaring(m, f).__name__, f) for m in models for f in m.model_fields}
    missing = wanted - _fields_set(_kitchen_sink(), set())
    assert not missing, f"kitchen_sink.yaml does not set: {sorted(missing)}"


def test_kitchen_sink_features() -> None:
    t = _kitchen_sink()
    cat = default_catalog()
    assert {"use" if isinstance(m, ModuleUse) else m.form for m in t.modules} == set(FORMS) | {"use"}
    assert {hp.type for hp in t.hyperparameters.values()} == {"int", "float", "bool", "choice", "ints"}
    concrete = [m for m in t.modules if not isinstance(m, ModuleUse)]
    layers = [m.layers for m in t.modules if m.layers is not None]
    assert "all" in layers and any(isinstance(x, list) for x in layers)
    ranges = [x for x in layers if isinstance(x, LayerRange)]
    assert all(any(getattr(r, k) is not None for r in ranges) for k in ("first", "last", "every"))
    specs = [p for m in t.modules for p in (m.params or {}).values()]
    assert {p.shared for p in specs} == {"none", "layers", "sites", "all"}
    assert any(not p.trainable for p in specs)
    assert any(isinstance(d, int) for p in specs for d in p.shape)
    assert any(m.host_update for m in concrete)
    assert any(getattr(m, "integrate", "h + delta") != "h + delta" for m in concrete)
    use = next(m for m in t.modules if isinstance(m, ModuleUse))
    assert use.use.split(".")[0] in cat.techniques and use.integrate and use.params
    assert t.paper.url and t.notes and t.typology and t.original


def test_kitchen_sink_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(KITCHEN_SINK)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["show", str(KITCHEN_SINK)])
    assert result.exit_code == 0, result.output
    assert "reused_lora" in result.output and "lora.lora" in result.output


def test_loading_the_whole_catalog_uncached() -> None:
    """Loading and checking the whole catalog, uncached (its time: benchmarks/bench_budgets.py)."""
    from pefref.language.catalog import load_catalog

    cat = load_catalog()
    assert len(cat.techniques) >= 30 and cat.techniques.keys() == default_catalog().techniques.keys()
