"""torch.compile runs an adapted model, and compiled units are generated code, not an interpreter.

The default backend here is ``aot_eager`` (dynamo capture + AOT autograd, no
code generation), which checks what matters for pefref (the patched forwards
trace into one graph, forward and backward agree with eager) in a few seconds.
One test also compiles with inductor (C++ kernels; about 20 s cold on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import transformers

from pefref.compiler.units import Unit
from pefref.language import expr as pefref_expr
from pefref.language.catalog import default_catalog
from pefref.language.check import expand_modules
from pefref.models.build import applicable
from pefref.ops import PRIMITIVES
from pefref.runtime.api import apply
from pefref.view.params import count_params

from .conftest import TINY, tiny_model

TOL = 1e-5
# every technique that runs units (select modules only unfreeze host parameters: nothing is compiled)
TECHNIQUES = sorted(t.id for t in default_catalog().techniques.values() if any(m.form != "select" for m in expand_modules(t, default_catalog().techniques)[0]))


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    shape = default_catalog().shape("tiny-llama")
    cfg = transformers.AutoConfig.for_model("llama", **shape.config)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def adapted(seed: int = 0):
    """tiny-llama with pefref LoRA, B non-zero (so the adapter changes the output)."""
    model = tiny_llama(seed)
    adapter = apply(model, "lora", r=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in adapter.named_trainable_parameters().items():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, adapter


def input_ids(batch: int = 2, seq: int = 16) -> torch.Tensor:
    vocab = default_catalog().shape("tiny-llama").config["vocab_size"]
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _base_logits(ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tiny_llama().eval()(input_ids=ids).logits


# --- torch.compile --------------------------------------------------------------


def test_adapted_model_traces_without_graph_breaks() -> None:
    model, _ = adapted()
    explained = torch._dynamo.explain(model.eval())(input_ids=input_ids())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_forward_equals_eager() -> None:
    model, _ = adapted()
    model.eval()
    ids = input_ids()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
    assert (eager - _base_logits(ids)).abs().max() > 1e-3, "B is non-zero: the adapter must change the output"
    assert (compiled - eager).abs().max().item() <= TOL


def test_compiled_training_step_equals_eager() -> None:
    """Forward and backward through the compiled model: same logits, same adapter gradients."""
    ids = input_ids()
    results = []
    for compile_it in (False, True):
        model, adapter = adapted()
        model.train()
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compile_it else model
        logits = run(input_ids=ids).logits
        logits.mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in adapter.named_trainable_parameters().items()}
        assert all(g.abs().max() > 0 for g in grads.values())
        assert all(p.grad is None for n, p in model.named_parameters() if "pefref_adapters" not in n)
        results.append((logits.detach(), grads))
    (eager, g_eager), (compiled, g_compiled) = results
    assert (compiled - eager).abs().max().item() <= TOL
    assert g_eager.keys() == g_compiled.keys()
    for n in g_eager:
        assert (g_compiled[n] - g_eager[n]).abs().max().item() <= TOL, n


def test_compiled_model_follows_disable() -> None:
    """The adapter's on/off state is guarded: inside disable() the compiled model is the base model."""
    model, adapter = adapted()
    model.eval()
    ids = input_ids()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        on = compiled(input_ids=ids).logits
        with adapter.disable():
            off = compiled(input_ids=ids).logits
        on_again = compiled(input_ids=ids).logits
        eager = model(input_ids=ids).logits
    assert (on - off).abs().max() > 1e-3
    assert (off - _base_logits(ids)).abs().max().item() <= TOL
    assert (on - eager).abs().max().item() <= TOL
    assert (on_again - eager).abs().max().item() <= TOL


def test_inductor_forward_equals_eager() -> None:
    """The real compiler (inductor generates and builds C++ kernels: about 20 s cold on this machine)."""
    model, _ = adapted()
    model.eval()
    ids = input_ids()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="inductor", fullgraph=True)(input_ids=ids).logits
    assert (compiled - eager).abs().max().item() <= TOL


# --- generated code, no interpretation ------------------------------------------------


def _units(technique: str) -> list[Unit]:
    """The units of ``technique`` on the first tiny family it places parameters on (Llama first)."""
    cat = default_catalog()
    t = cat.technique(technique)
    modules = expand_modules(t, cat.techniques)[0]
    fam = next(f for f in ("llama", *TINY) if applicable(modules, cat.family(f)) and (t.frozen or count_params(t, cat.shape(TINY[f]), cat).trainable))
    units = list(apply(tiny_model(fam), technique).units.values())
    assert units or all(m.form == "select" for m in modules)
    return units


def test_lora_unit_code_is_straight_line() -> None:
    units = _units("lora")
    assert units
    for unit in units:
        assert isinstance(unit, Unit) and isinstance(unit.graph, fx.Graph)
        code = unit.code
        assert "evaluate" not in code and "parse_expr" not in code and "pefref.language.expr" not in code, code
        assert "linear" in code  # the primitive is called directly
        calls = [n for n in unit.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
        assert len(calls) <= 6, code  # two linears, a scale, an add


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_units_never_call_the_interpreter(technique: str) -> None:
    """Every node of every unit's graph calls a registered primitive or a builtin operator, never pefref.expr."""
    allowed = {p.fn for p in PRIMITIVES.values()}
    for unit in _units(technique):
        assert "evaluate" not in unit.code, unit.code
        for node in unit.graph.nodes:
            if node.op == "call_function":
                target = node.target
                assert getattr(target, "__module__", "") != pefref_expr.__name__, (technique, node.format_node())
                assert target in allowed or getattr(target, "__module__", "") in ("_operator", "operator", "builtins") \
                    or str(getattr(target, "__module__", "")).startswith("torch"), (technique, node.format_node())
            assert node.op != "call_module" or not node.target.startswith("exprs"), node.format_node()
