"""Runtime costs that must be zero: merged hosts run their own forward, units share their generated code,
torch.compile captures every technique without graph breaks."""

from __future__ import annotations

import pickle

import pytest
import torch

from pefref.compiler.units import Unit
from pefref.language.catalog import default_catalog
from pefref.language.check import expand_modules
from pefref.models.build import applicable
from pefref.runtime.api import apply
from pefref.runtime.patches import HostPatch
from pefref.view.params import count_params

from .conftest import TINY, model_inputs, tiny_model

TOL = 1e-5


def _lora(r: int = 4):
    model = tiny_model("llama")
    adapter = apply(model, "lora", r=r)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapter.named_trainable_parameters().items():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, adapter


def _hosts(adapter) -> list[torch.nn.Module]:
    return [patch.host for patch, _e in adapter.entries if isinstance(patch, HostPatch)]


def test_one_token_decoding_after_merge_runs_the_base_forward(monkeypatch) -> None:
    model, adapter = _lora()
    model.eval()
    ids = torch.tensor([[5, 9, 13, 2]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    hosts = _hosts(adapter)
    assert hosts and all("forward" in h.__dict__ for h in hosts)  # patched while unmerged
    adapter.merge()
    assert all("forward" not in h.__dict__ for h in hosts), "merged hosts must run their class's own forward"

    calls = []
    monkeypatch.setattr(HostPatch, "run", lambda self, *a, **k: calls.append(self) or (_ for _ in ()).throw(AssertionError("patched")))
    with torch.no_grad():
        out = model(input_ids=ids[:, :3], use_cache=True)
        step = model(input_ids=ids[:, 3:], past_key_values=out.past_key_values, use_cache=True).logits  # one token
    assert not calls
    assert (step[:, -1] - adapted[:, -1]).abs().max().item() <= 1e-4  # the merged weights carry the update
    monkeypatch.undo()

    adapter.unmerge()
    assert all("forward" in h.__dict__ for h in hosts)  # patched again
    with torch.no_grad():
        again = model(input_ids=ids).logits
    assert (again - adapted).abs().max().item() <= TOL
    adapter.remove()
    assert all("forward" not in h.__dict__ and not hasattr(h, "_pefref_patch") for h in hosts)


def test_a_second_adapter_on_a_merged_host_is_patched_in() -> None:
    model, first = _lora()
    first.merge()
    second = apply(model, "lora", r=2, name="second")
    hosts = _hosts(second)
    assert all("forward" in h.__dict__ for h in hosts)  # the new entry runs
    second.remove()
    assert all("forward" not in h.__dict__ for h in hosts)  # first is still merged: its own forward again
    first.unmerge()
    assert all("forward" in h.__dict__ for h in hosts)
    first.remove()
    assert all("forward" not in h.__dict__ for h in hosts)


def test_units_of_one_description_share_one_generated_class() -> None:
    _model, adapter = _lora()
    units = list(adapter.units.values())
    assert len(units) >= 4
    classes = {type(u) for u in units}
    assert len(classes) == 1, classes  # q and v of every layer of tiny-llama have the same widths
    u0, u1 = units[0], units[1]
    assert u0.A is not u1.A  # only tensors differ
    assert isinstance(u0, Unit) and u0.forward.__func__ is u1.forward.__func__
    # pickling goes through the program (the generated class cannot be found by name)
    clone = pickle.loads(pickle.dumps(u0))
    x = torch.randn(2, u0.A.shape[1])
    h = torch.randn(2, u0.B.shape[0])
    assert type(clone) is type(u0)
    assert torch.equal(clone.forward(x, h, None, False), u0.forward(x, h, None, False))


# --- torch.compile: no graph breaks ---------------------------------------------------------

ALL = sorted(default_catalog().techniques)


def _family_for(tid: str) -> str:
    """The first tiny family (Llama first) that binds the technique's sites and gives it something to train (or, for a
    technique that trains nothing, places it)."""
    cat = default_catalog()
    t = cat.technique(tid)
    modules = expand_modules(t, cat.techniques)[0]
    return next(f for f in ("llama", *TINY) if applicable(modules, cat.family(f)) and (t.frozen or count_params(t, cat.shape(TINY[f]), cat).trainable))


@pytest.mark.parametrize("tid", ALL)
def test_no_graph_breaks_under_dynamo(tid: str) -> None:
    """One training-mode forward of the adapted tiny model is captured by dynamo as one graph."""
    fam = _family_for(tid)
    model = tiny_model(fam)
    apply(model, tid)
    model.train()
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(**model_inputs(fam))
    finally:
        torch._dynamo.reset()
    # a technique reading a first forward pass (pass: first) runs the model twice per call: one graph per pass
    passes = 1 + any(c.first_pass for m in default_catalog().technique(tid).modules for c in (getattr(m, "inputs", None) or {}).values())
    assert explained.graph_break_count == passes - 1, [str(r)[:400] for r in explained.break_reasons]
    assert explained.graph_count == passes


def test_partial_catalog_loads_each_technique_as_the_whole_catalog_does() -> None:
    """apply by id loads only the technique and what it uses or extends: the same Technique as the full catalog's."""
    from pefref.language.catalog import load_catalog

    full = default_catalog()
    for tid in sorted(full.techniques):
        part = load_catalog(only={tid})
        assert part.techniques[tid] == full.techniques[tid], tid
        assert len(part.techniques) < len(full.techniques)


# --- scale: apply on the meta device, then load real weights -------------------------------------


def test_apply_on_meta_then_load_real_weights() -> None:
    """A model built on the meta device takes the adapter without allocating anything; real base weights
    and adapter weights loaded afterwards give the outputs of the adapter applied to the real model."""
    import transformers

    from pefref.models.build import build_model

    real = build_model("tiny-llama", seed=0).eval()
    ref_adapter = apply(real, "lora", r=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ref_adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = real(**inputs).logits
    base_state = {k: v for k, v in real.state_dict().items() if not k.startswith("pefref_adapters.")}

    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(real.config)
    adapter = apply(meta, "lora", r=4)
    tensors = list(meta.parameters()) + list(meta.buffers())
    assert all(t.is_meta for t in tensors), "nothing may be allocated before loading"
    assert adapter.num_trainable() == ref_adapter.num_trainable()

    meta.to_empty(device="cpu")  # storage, once, at load time
    missing, unexpected = meta.load_state_dict(base_state, strict=False)
    assert not unexpected and all(k.startswith("pefref_adapters.") or "rotary_emb" in k for k in missing), (missing, unexpected)
    adapter.load_state_dict(ref_adapter.state_dict())
    with torch.no_grad():  # non-persistent buffers (rotary frequencies) are not in a state dict: computed ones
        for name, buf in real.named_buffers():
            if not name.startswith("pefref_adapters."):
                meta.get_buffer(name).copy_(buf)
    meta.eval()
    with torch.no_grad():
        got = meta(**inputs).logits
    assert (got - expected).abs().max().item() <= TOL


def test_meta_fillers_give_the_real_shapes_and_dtypes_without_drawing() -> None:
    """On the meta device a filler initialiser makes an empty tensor of the shape and dtype the real path
    makes (no random draw: the global generator is untouched); its arguments are still checked."""
    from pefref.ops.inits import FILLERS, init_table

    real, meta = init_table((6, 4), torch.float32, "cpu"), init_table((6, 4), torch.float32, "meta")
    assert {"zeros", "normal", "kaiming_uniform", "orthogonal"} <= FILLERS and "random_positions" not in FILLERS
    for name in sorted(FILLERS):
        want = real[name]()
        state = torch.get_rng_state()
        got = meta[name]()
        assert torch.equal(state, torch.get_rng_state()), name
        assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype, name
    with pytest.raises(TypeError):
        meta["normal"](stdev=1.0)
    with pytest.raises(TypeError):
        meta["kaiming_uniform"](1.0, 2.0)


@pytest.mark.parametrize("tid", ["dora", "oft", "p_tuning_lstm"])
def test_meta_apply_has_the_real_apply_s_tensors(tid: str) -> None:
    """apply on the meta device (fillers skipped) gives tensors of the real apply's names, shapes and dtypes."""
    import transformers

    from pefref.models.build import build_model

    real = build_model("tiny-llama", seed=0)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(real.config)
    a, b = apply(real, tid), apply(meta, tid)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sb[k].is_meta and sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, k
