"""The forms' and block kinds' registry: every entry provides every facet, the schema agrees with it, and the
layers read it (a new form is one entry: what a layer knows of a form it takes from the entry)."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

import pefref
from pefref.language import forms as registry
from pefref.language.check import _FIELD_READS, _OWN_READS
from pefref.language.connections import OUTPUT_FORMS
from pefref.language.forms import BLOCKS, FORMS, Integration, Merge, Rule
from pefref.language.schema import FORMS as SCHEMA_FORMS
from pefref.language.schema.composition import BLOCK_KINDS, Block
from pefref.language.schema.technique import Module
from pefref.language.yamlsrc import read_yaml
from pefref.render.blocks import BLOCK_MEANING
from pefref.render.style import FORM_COLOURS, FORM_FILLS, FORM_MEANING
from pefref.view.composition import FOLDING_BLOCKS

ROOT = Path(pefref.__file__).parent
PEFREF = ROOT.parent


def _tags(union: object) -> set[str]:
    """The discriminator tags of a schema union (Annotated[Union[Annotated[cls, Tag(...)], ...], ...])."""
    out = set()
    for arm in typing.get_args(typing.get_args(union)[0]):
        cls = typing.get_args(arm)[0] if typing.get_origin(arm) is typing.Annotated else arm
        kind = cls.model_fields.get("form") or cls.model_fields.get("kind")
        if kind is not None:
            out |= set(typing.get_args(kind.annotation))
    return out


def test_the_schema_declares_exactly_the_registered_forms_and_blocks() -> None:
    assert tuple(FORMS) == SCHEMA_FORMS
    assert _tags(Module) == set(FORMS)
    assert tuple(BLOCKS) == BLOCK_KINDS
    assert _tags(Block) == set(BLOCKS)


@pytest.mark.parametrize("name", list(FORMS))
def test_every_form_provides_every_facet(name: str) -> None:
    f = FORMS[name]
    assert f.name == name and f.summary and f.legend
    assert isinstance(f.integration, Integration) and isinstance(f.merge, Merge) and isinstance(f.rule, Rule)
    assert f.colour.startswith("#") and f.fill.startswith("#")
    assert f.insertion in ("parallel", "sequential", "in-place")
    assert set(f.rule.results) <= set(f.rule.fields)
    assert {b for b, _ in f.rule.binds} <= set(f.rule.fields)
    assert set(f.rule.fields) <= set(f.reads), "every compiled field has its reads declared"
    assert f.own_reads <= set(f.reads)
    assert set(f.side_rules) <= set(f.reads)
    assert f.has_unit == bool(f.rule.fields)
    assert f.reads_input in (None, "x", "h")
    assert (f.integration is Integration.HIDDEN) == (f.reads_input is not None)
    if f.publishes:
        assert f.rule.published is not None
    schema_fields = set(next(cls for cls in _classes() if typing.get_args(cls.model_fields["form"].annotation) == (name,)).model_fields)
    assert set(f.reads) <= schema_fields, "the form's expression fields are fields of its schema class"


def _classes() -> list[typing.Any]:
    out = []
    for arm in typing.get_args(typing.get_args(Module)[0]):
        cls = typing.get_args(arm)[0]
        if "form" in cls.model_fields:
            out.append(cls)
    return out


def test_the_interaction_table_gives_each_form_the_stage_its_entry_says() -> None:
    data, _pos = read_yaml(PEFREF / "catalog" / "reference" / "interactions.yaml")
    assert {k: v["stage"] for k, v in data["forms"].items()} == {f.name: f.stage for f in FORMS.values()}
    assert set(data["blocks"]) == set(BLOCKS)


def test_the_layers_derive_their_tables_from_the_registry() -> None:
    assert list(FORM_COLOURS) == list(FORMS) == list(FORM_FILLS) == list(FORM_MEANING)
    assert set(BLOCK_MEANING) == set(BLOCKS)
    assert set(FOLDING_BLOCKS) == {b.name for b in BLOCKS.values() if b.folds}
    assert set(OUTPUT_FORMS) == {f.name for f in FORMS.values() if f.publishes}
    assert {k for k in _FIELD_READS} == {(f.name, fld) for f in FORMS.values() for fld in f.reads}
    assert {k for k in _OWN_READS} == {(f.name, fld) for f in FORMS.values() for fld in f.own_reads}


def test_form_names_are_written_only_in_the_registry_and_the_schema() -> None:
    """String literals equal to a form's name appear only in the registry and the schema's declarations."""
    names = set(FORMS)
    files = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")
             if any(isinstance(n, ast.Constant) and n.value in names for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))))}
    assert files <= {"language/forms.py", "language/schema/technique.py", "language/schema/composition.py"}


def test_a_new_form_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A toy form registered in a test: the compiler runs its rule, the view derives its typology and
    mergeability, the renderer's style and the checks read its entry, without code naming it."""
    import torch

    from pefref.compiler.units import SharedStore, SiteContext, build_unit
    from pefref.view.analysis import mergeability
    from pefref.view.typology import _input, _insertion, _integration

    toy = dataclasses.replace(FORMS["rescale"], name="toy_scale", colour="#000001", fill="#000002", legend="a toy",
                              integration_form="toy rescaling", insertion="parallel")
    monkeypatch.setattr(registry, "FORMS", {**FORMS, "toy_scale": toy})

    from pefref.language.schema.technique import ParamSpec

    class Spec:
        name, form, inputs, scale, side, sites = "t", "toy_scale", {}, "s * 2.0", "output", ["attn.o"]
        params = {"s": ParamSpec(shape=["d_out"], init="ones()")}

    unit = build_unit(Spec(), SiteContext("attn.o", 0, 4, 4, {"d": 4}), {}, SharedStore())
    assert unit is not None and unit.form == "toy_scale"
    assert torch.equal(unit.forward(None, None, None, False), torch.full((4,), 2.0))
    assert (_insertion(Spec()), _integration(Spec()), _input(Spec())) == ("parallel", "toy rescaling", "hidden states")
    assert mergeability(Spec(), ["linear"]) == "yes"


def test_an_adapted_model_deep_copies_as_an_independent_model() -> None:
    """Registry entries copy as themselves, so ``copy.deepcopy`` of an adapted model (an EMA copy, a second run
    from the same start) gives an equal model whose adapter trains on its own."""
    import copy

    import torch

    from tests.test_compile_torch import tiny_llama

    assert copy.deepcopy(FORMS["parallel"]) is FORMS["parallel"] and copy.copy(BLOCKS["stack"]) is BLOCKS["stack"]
    model = tiny_llama()
    pefref.apply(model, "lora")
    x = torch.randint(0, 100, (2, 5))
    y = model(x).logits
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x).logits, y)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(0.1)
    assert torch.equal(model(x).logits, y) and not torch.allclose(twin(x).logits, y)
