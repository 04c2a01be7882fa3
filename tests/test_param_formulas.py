"""The parameter formulas the site and `pefref params` print are the counts they stand beside."""

from __future__ import annotations

import pytest

from pefref.language.catalog import default_catalog
from pefref.language.sizes import eval_scalar, model_sizes
from pefref.view.params import count_params

_CAT = default_catalog()
SHAPES = ["llama-2-7b", "gpt2", "bert-base-uncased", "t5-base", "pythia-160m"]


@pytest.mark.parametrize("tid", sorted(_CAT.techniques))
def test_formula_evaluates_to_the_count(tid: str) -> None:
    t = _CAT.techniques[tid]
    for name in SHAPES:
        shape = _CAT.shape(name)
        pc = count_params(t, shape, _CAT)
        names = {**model_sizes(_CAT.family(shape.family), dict(shape.config)), **pc.hyperparameters}
        value = eval_scalar(pc.formula.replace("·", "*").replace("^", "**"), names)
        assert value == pc.trainable, (name, pc.formula)
        assert not pc.formula.startswith("-"), (name, pc.formula)  # a count reads as a positive product
