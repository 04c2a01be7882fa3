"""Compositions as data: the catalog's compositions validate; broken ones get located errors from the interaction rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.catalog import catalog_root, default_catalog
from pefref.language.composition import load_composition, load_rules
from pefref.language.errors import CatalogError
from pefref.language.loader import validate_data
from pefref.language.schema import FORMS, Composition, InteractionRules
from pefref.language.schema.composition import BLOCK_KINDS
from pefref.language.yamlsrc import parse_yaml

ROOT = catalog_root()
COMPOSITIONS = sorted((ROOT / "compositions").glob("*.yaml"))
BROKEN = Path(__file__).parent / "fixtures" / "compositions"
SCHEMA_LINE = "# yaml-language-server: $schema="


def test_at_least_three_compositions_using_every_block_kind() -> None:
    assert len(COMPOSITIONS) >= 3
    kinds = {b.kind for p in COMPOSITIONS for b in load_composition(p, default_catalog()).composition.blocks}
    assert kinds == set(BLOCK_KINDS)


@pytest.mark.parametrize("path", [*COMPOSITIONS, ROOT / "reference" / "interactions.yaml"], ids=lambda p: p.stem)
def test_schema_line(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(SCHEMA_LINE)
    target = (path.parent / first[len(SCHEMA_LINE):].strip()).resolve()
    kind = "interactions" if path.stem == "interactions" else "composition"
    assert target.name == f"{kind}.schema.json" and target.is_file()


@pytest.mark.parametrize("path", COMPOSITIONS, ids=lambda p: p.stem)
def test_composition_validates_and_round_trips(path: Path) -> None:
    res = load_composition(path, default_catalog())
    assert res.composition.id == path.stem
    data = res.composition.model_dump(mode="json", exclude_defaults=False)
    text = yaml.safe_dump(data, sort_keys=False)
    again, pos = parse_yaml(text, "<composition>")
    assert validate_data(Composition, again, pos) == res.composition


def test_rules_cover_every_form_and_block() -> None:
    rules = load_rules()
    assert set(rules.forms) == set(FORMS) and set(rules.blocks) == set(BLOCK_KINDS)
    assert rules.stage_of("reparameterise") == "weight" and rules.stage_of("rescale", input_side=True) == "input"
    assert rules.pair("select", "select") is not None and not rules.pair("select", "select").allowed  # type: ignore[union-attr]
    assert isinstance(rules, InteractionRules)


# file, [(line, column, field, words in the message)]
CASES = [
    ("unknown_technique", [(6, 26, "techniques[0].technique", "did you mean 'lora'?"),
                           (7, 49, "techniques[1].hyperparameters", "unknown hyperparameter 'rank'"),
                           (9, 33, "blocks[0].adapters[1]", "no adapter named 'c'")]),
    ("fusion_of_weights", [(9, 11, "blocks[0].kind", "cannot combine the reparameterise module 'oft'")]),
    ("stack_against_stages", [(10, 15, "blocks[0].adapters", "puts 'ia3' (output stage) before 'dora' (weight stage)")]),
    ("parallel_mixed_stages", [(9, 11, "blocks[0].kind", "run in different stages (lora: output; dora: weight)")]),
    ("two_owners", [(7, 31, "techniques[1].technique", "cannot both own one host tensor")]),
    ("no_shared_site", [(16, 13, "blocks[0].sites[0]", "adapter 'lora' has no module at site 'attn.v'")]),
]


@pytest.mark.parametrize(("name", "expected"), CASES, ids=[c[0] for c in CASES])
def test_broken_compositions_are_located(name: str, expected: list[tuple[int, int, str, str]]) -> None:
    with pytest.raises(CatalogError) as ei:
        load_composition(BROKEN / f"{name}.yaml", default_catalog())
    got = ei.value.problems
    for line, col, field, words in expected:
        hits = [p for p in got if p.location.line == line and p.location.column == col and p.field == field and words in p.message]
        assert hits, f"no problem at {line}:{col} {field} with {words!r}; got:\n" + "\n".join(map(str, got))
    assert all(p.location.file.endswith(f"{name}.yaml") for p in got)


def test_broken_structure_is_located(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("id: bad\nname: Bad\ntechniques:\n  - {name: a, technique: lora}\nblocks:\n  - {kind: fuse, adapters: [a, a]}\n", encoding="utf-8")
    with pytest.raises(CatalogError) as ei:
        load_composition(p, default_catalog())
    (prob,) = ei.value.problems
    assert prob.location.line == 6 and prob.field.startswith("blocks[0]")


def test_cli_validate(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["validate"])
    assert r.exit_code == 0, r.output
    assert f"{len(COMPOSITIONS)} compositions" in r.output
    r = CliRunner().invoke(app, ["validate", str(BROKEN / "stack_against_stages.yaml"), "--json"])
    assert r.exit_code == 1
    r = CliRunner().invoke(app, ["validate", *map(str, COMPOSITIONS)])
    assert r.exit_code == 0, r.output


def test_compositions_are_drawable() -> None:
    from pefref.render.diagram import technique_graph

    cat = default_catalog()
    res = load_composition(ROOT / "compositions" / "adapter_fusion.yaml", cat)
    techs = res.drawable()
    assert [t.id for t in techs] == ["task_a", "task_b", "task_c"]
    assert techs[2].hyperparameters["r"].default == 96  # the composition's value
    g = technique_graph(cat, techs, model="tiny-llama")
    assert g.graph["techniques"] == ["task_a", "task_b", "task_c"]
    res = load_composition(ROOT / "compositions" / "oft_dora_stack.yaml", cat)
    assert all(set(m.sites) <= {"attn.q", "attn.v"} for t in res.drawable() for m in t.modules)
    r = CliRunner().invoke(app, ["diagram", str(ROOT / "compositions" / "lora_ia3_stack.yaml"), "--format", "dot"])
    assert r.exit_code == 0 and "digraph" in r.output


def test_docs_show_the_rules() -> None:
    from pefref.language.composition import rules_markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "explanation" / "composition.md").read_text(encoding="utf-8")
    assert rules_markdown(load_rules()) in page, "docs/explanation/composition.md is out of date: paste rules_markdown(load_rules())"
