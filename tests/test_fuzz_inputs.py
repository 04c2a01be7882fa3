"""Fuzzing the language: techniques generated from the schema and mutations of every catalog file and map.

Property: any input either validates or gives located problems (no traceback), within a bounded time.
Case counts are printed with ``-s`` (``FUZZ_COUNTS``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pefref.language.catalog import catalog_root, default_catalog
from pefref.language.check import check_family
from pefref.language.errors import CatalogError, PefrefError
from pefref.language.loader import validate_data
from pefref.language.schema import ArchitectureMap
from pefref.language.validate import validate_paths
from pefref.language.yamlsrc import parse_yaml

FUZZ_COUNTS: dict[str, int] = {}
pytestmark = pytest.mark.timeout(600)  # per test: a case that never ends fails it (no time is asserted)
FILES = sorted((catalog_root() / "techniques").glob("*.yaml"))
MAPS = sorted((catalog_root() / "families").glob("*.yaml"))

def _settings(n: int) -> settings:
    return settings(deadline=None, max_examples=n, derandomize=True, suppress_health_check=list(HealthCheck), database=None)

NASTY = st.sampled_from([
    "10**10**10", "1" * 5000, "d_in // 0", "(" * 300 + "1" + ")" * 300, " + ".join(["x"] * 1500), "\x00", "\x1b[31m",
    ".nan", ".inf", "true", "null", "[]", "{}", "x.__class__", "{i.__class__}", "{x}", "-1", "2**40", "r - r", "'", "&a", "*a",
    "!!python/object:os.system", "é" * 50, "h + delta", "d_inner", "sqrt(-1)", "1e400",
])


def _count(name: str) -> None:
    FUZZ_COUNTS[name] = FUZZ_COUNTS.get(name, 0) + 1


def _mutations(data: object, draw: st.DrawFn) -> object:
    """Replace, delete or duplicate one node of ``data`` (a YAML tree)."""
    paths: list[tuple[object, ...]] = []

    def walk(node: object, path: tuple[object, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(data, ())
    path = draw(st.sampled_from(paths[1:] or paths))
    new = draw(st.one_of(NASTY, st.integers(min_value=-(10**40), max_value=10**40), st.floats(allow_nan=True, allow_infinity=True),
                         st.booleans(), st.none(), st.text(max_size=30), st.lists(st.integers(-3, 3), max_size=3)))
    parent = data
    for k in path[:-1]:
        parent = parent[k]  # type: ignore[index]
    key = path[-1]
    if draw(st.booleans()) and isinstance(parent, dict):
        parent.pop(key, None)  # type: ignore[union-attr]
    else:
        parent[key] = new  # type: ignore[index]
    return data


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
@_settings(2)
@given(data=st.data())
def test_mutated_catalog_technique_gives_located_problems(tmp_path_factory, path: Path, data: st.DataObject) -> None:
    tree = yaml.safe_load(path.read_text())
    mutated = _mutations(tree, data.draw)
    try:
        text = yaml.safe_dump(mutated, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return
    out = tmp_path_factory.mktemp("fuzz") / path.name
    out.write_text(text)
    problems, _ = validate_paths([out])
    _count("technique mutations")
    for p in problems:
        assert p.location.file and str(p), p


@pytest.mark.parametrize("path", MAPS, ids=[p.stem for p in MAPS])
@_settings(5)
@given(data=st.data())
def test_mutated_architecture_map_gives_located_problems(path: Path, data: st.DataObject) -> None:
    tree = yaml.safe_load(path.read_text())
    mutated = _mutations(tree, data.draw)
    try:
        text = yaml.safe_dump(mutated, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return
    _count("map mutations")
    try:
        parsed, pos = parse_yaml(text, "map.yaml")
        fam = validate_data(ArchitectureMap, parsed, pos)
    except CatalogError as e:
        assert e.problems and all(p.location.file == "map.yaml" for p in e.problems)
        return
    problems = check_family(fam, pos, default_catalog().reference)
    assert all(p.location.file == "map.yaml" for p in problems)


EXPR = st.recursive(
    st.one_of(st.sampled_from(["r", "d_in", "d_out", "d", "alpha", "x", "h", "delta", "W", "1", "0", "2.5", "10**10**10"]),
              st.integers(-5, 10**6).map(str)),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "@"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["linear", "sqrt", "max", "relu", "zeros", "diag", "kron", "softmax"]), st.lists(inner, max_size=3)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})"),
    ),
    max_leaves=12,
)


@st.composite
def techniques(draw: st.DrawFn) -> str:
    """A technique built from the schema's shape: hyperparameters, modules of every form, generated expressions."""
    form = draw(st.sampled_from(["parallel", "sequential", "reparameterise", "rescale", "prepend", "select"]))
    site = draw(st.sampled_from(["attn.q", "attn.v", "ffn.up", "ffn.down", "attn.o", "ffn.act", "embed.output", "attn.kv", "ffn.norm", "layer", "attn.qkv"]))
    hp_type = draw(st.sampled_from(["int", "float", "bool"]))
    default = {"int": draw(st.integers(-3, 10**12)), "float": draw(st.floats(allow_nan=True, allow_infinity=True)), "bool": draw(st.booleans())}[hp_type]
    dims = draw(st.lists(st.one_of(EXPR, st.integers(-2, 64), st.booleans()), min_size=1, max_size=3))
    module: dict[str, object] = {"name": "m", "sites": [site], "form": form,
                                 "params": {"A": {"shape": dims, "init": draw(st.sampled_from(["zeros()", "ones()", "normal(std=0.02)", "W", "eye()", draw(EXPR)]))}}}
    expr = draw(EXPR)
    if form in ("parallel", "sequential"):
        module |= {"compute": expr, "integrate": draw(st.sampled_from(["h + delta", draw(EXPR)]))}
    elif form == "reparameterise":
        module["weight"] = expr
    elif form == "rescale":
        module["scale"] = expr
    elif form == "prepend":
        module |= {"length": draw(st.sampled_from(["r", "0", "10**10**10", "4"])), "tokens": expr}
    else:
        module = {"name": "m", "sites": [site], "form": "select", "targets": ["bias"]}
    doc = {"id": "fuzzed", "name": "Fuzzed", "paper": {"title": "t", "authors": "a", "year": 2024, "arxiv": "2401.00001"},
           "hyperparameters": {"r": {"type": hp_type, "default": default}, "alpha": {"type": "float", "default": 8.0}},
           "modules": [module]}
    return yaml.safe_dump(doc, sort_keys=False)


@_settings(15)
@given(text=techniques())
def test_generated_techniques_validate_or_give_located_problems(tmp_path_factory, text: str) -> None:
    p = tmp_path_factory.mktemp("gen") / "fuzzed.yaml"
    p.write_text(text)
    problems, report = validate_paths([p])
    _count("generated techniques")
    assert problems or report["techniques"] == ["fuzzed"]
    for pr in problems:
        assert pr.location.file and pr.location.line >= 0
    if not problems:  # a technique that validates also counts, shows and applies without a traceback
        from pefref.language.catalog import load_techniques
        from pefref.view.params import count_params

        cat = default_catalog()
        t = load_techniques([p], cat.reference, cat.techniques)[0]["fuzzed"]
        with contextlib.suppress(PefrefError):
            count_params(t, cat.shape("tiny-llama"), cat)


def test_report_fuzz_counts() -> None:
    print("FUZZ_COUNTS", FUZZ_COUNTS)
