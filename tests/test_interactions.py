"""Interactions: modules that read other modules' outputs (same, previous or last layer) or other sites' hidden states.

Ladder side tuning is checked against a plain-torch version of the paper's equations (hooks on the model's own
modules, paths written in the reference tests) on tiny Llama, GPT-2 and BERT; a module reading a site it does not
attach to likewise; connections that cannot run are located validate errors; the typology shows them.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from pefref.language.catalog import catalog_root, default_catalog, load_techniques
from pefref.runtime.api import apply
from pefref.view.typology import derive_typology

from .test_reference_impls import CAUSAL, PATHS, SHAPES, TOL, Hand, Units, _base, _perturb, family_of, inputs_for, model_sizes, output_of, tiny_attention
from .test_reference_routing import train_steps

CAT = default_catalog()


def _out(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


def _lst_reference(hand: Hand, u: Units, hp: dict[str, Any]) -> None:
    """Sung et al. §3: z_i = mu_i s_{i-1} + (1 - mu_i) down_i(h_i), s_i = f_i(z_i); the last state, projected up, replaces h_L."""
    state: dict[str, torch.Tensor] = {}
    g0 = u("side_in", "embed.output")
    emb = hand.model.get_submodule(PATHS[hand.fam]["embed"])
    hand.handles.append(emb.register_forward_hook(lambda _m, _a, out: state.__setitem__("s", out @ g0("Wd").T + g0("bd"))))
    for i in range(hand.L):
        gl, ga, gf = u("ladder", "layer", i), u("side_attn", "layer", i), u("side_ffn", "layer", i)

        def post(_m: Any, _a: Any, out: Any, i: int = i, gl: Any = gl, ga: Any = ga, gf: Any = gf) -> Any:
            h = _out(out)
            mu = torch.sigmoid(gl("alpha") / hp["T"])
            z = mu * state["s"] + (1 - mu) * (h @ gl("Wd").T + gl("bd"))
            a = z + tiny_attention(z, ga, hp["side_heads"], CAUSAL[hand.fam], hand.mask)
            s = a + F.gelu(a @ gf("W1").T + gf("b1")) @ gf("W2").T + gf("b2")
            state["s"] = s
            if i != hand.L - 1:
                return out
            go = u("side_out", "layer", i)
            new = s @ go("Wu").T + go("bu")
            return (new, *out[1:]) if isinstance(out, tuple) else new

        hand.handles.append(hand.model.get_submodule(PATHS[hand.fam]["layer"].format(i=i)).register_forward_hook(post))


def _lst_count(z: dict[str, int], hp: dict[str, Any]) -> int:
    r = z["d"] // hp["reduction"]
    per_layer = (r * z["d"] + r + 1) + 4 * r * r + (4 * r * r + 4 * r + 4 * r * r + r)
    return (r * z["d"] + r) + z["L"] * per_layer + (z["d"] * r + z["d"])


def _setup(tid: str, shape: str, build: Any, **hps: Any) -> tuple[Any, Any, Hand, dict[str, torch.Tensor]]:
    fam = family_of(shape)
    model, ref = copy.deepcopy(_base(shape)), copy.deepcopy(_base(shape))
    a = apply(model, tid, **hps) if isinstance(tid, str) else apply(model, tid, **hps)
    _perturb(a)
    hand = Hand(ref, fam, model_sizes(fam)["L"])
    build(hand, Units(a), a.hyperparameters)
    return model, a, hand, inputs_for(fam)


def _compare(model: Any, hand: Hand, inputs: dict[str, torch.Tensor], shape: str) -> float:
    with torch.no_grad():
        base = output_of(_base(shape)(**inputs))
        ours = output_of(model(**inputs))
        theirs = hand.run(inputs)
    assert (theirs - base).abs().max() > 1e-3, "the reference did not change the model"
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
def test_ladder_side_tuning_matches_plain_torch(shape: str) -> None:
    model, a, hand, inputs = _setup("ladder_side_tuning", shape, _lst_reference)
    diff = _compare(model, hand, inputs, shape)
    assert diff <= TOL, f"ladder_side_tuning on {shape}: max abs diff {diff:.3g}"
    assert a.report.trainable == _lst_count(model_sizes(hand.fam), a.hyperparameters)
    # a second forward pass reads this pass's values, not the last one's
    other = {k: v.flip(0) for k, v in inputs.items()}
    with torch.no_grad():
        assert (output_of(model(**other)) - hand.run(other)).abs().max().item() <= TOL


def test_ladder_side_tuning_trains_without_touching_the_backbone() -> None:
    model = copy.deepcopy(_base("tiny-llama"))
    a = apply(model, "ladder_side_tuning")
    losses = train_steps(model, a, inputs_for("llama"))
    assert losses[-1] < losses[0], losses
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.trainable_parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def _spec(modules: list[dict[str, Any]], tid: str = "conn") -> dict[str, Any]:
    return {"id": tid, "name": "connection test", "paper": {"title": "t", "authors": "a", "year": 2024, "arxiv": "2401.00001"},
            "hyperparameters": {"r": {"type": "int", "default": 4}}, "modules": modules}


_SITE_READER = {  # a parallel adapter at the FFN block whose gate reads the attention block's input
    "name": "adapter", "sites": ["ffn.block"], "form": "parallel",
    "inputs": {"a": {"site": "attn.block", "tensor": "x"}},
    "params": {"Wd": {"shape": ["r", "d"], "init": "normal(std=0.2)"}, "Wu": {"shape": ["d", "r"], "init": "normal(std=0.2)"},
               "Wg": {"shape": [1, "d"], "init": "normal(std=0.2)"}},
    "compute": "sigmoid(linear(a, Wg)) * linear(relu(linear(x, Wd)), Wu)",
}


def _write(tmp_path: Any, spec: dict[str, Any]) -> Any:
    p = tmp_path / f"{spec['id']}.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.mark.parametrize("shape", SHAPES)
def test_a_module_reads_a_site_it_does_not_attach_to(tmp_path: Any, shape: str) -> None:
    path = _write(tmp_path, _spec([_SITE_READER]))

    def build(hand: Hand, u: Units, hp: dict[str, Any]) -> None:
        seen: dict[int, torch.Tensor] = {}
        for i in range(hand.L):
            attn_in = hand.model.get_submodule(hand.path("attn", i)[0])
            hand.handles.append(attn_in.register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: seen.__setitem__(i, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
            g = u("adapter", "ffn.block", i)
            hand.sublayer("ffn", i, lambda x, y, g=g, i=i: y + torch.sigmoid(seen[i] @ g("Wg").T) * (F.relu(x @ g("Wd").T) @ g("Wu").T))

    model, a, hand, inputs = _setup(str(path), shape, build)
    diff = _compare(model, hand, inputs, shape)
    assert diff <= TOL, f"site connection on {shape}: max abs diff {diff:.3g}"
    assert a.remove() is model


def _problems(tmp_path: Any, spec: dict[str, Any]) -> list[Any]:
    return load_techniques([_write(tmp_path, spec)], CAT.reference, CAT.techniques)[3]


def _lst_with(change: Any) -> dict[str, Any]:
    spec = yaml.safe_load((catalog_root() / "techniques" / "ladder_side_tuning.yaml").read_text())
    spec["id"] = "conn"
    change(spec["modules"])
    return spec


@pytest.mark.parametrize("change,field,message", [
    (lambda ms: ms[2]["inputs"]["z"].update(module="ladderr"), "modules[2].inputs.z.module", "unknown module 'ladderr'; did you mean 'ladder'?"),
    (lambda ms: ms[1]["inputs"]["s"].pop("fallback"), "modules[1].inputs.s.layer", "the first layer has no previous layer; add a fallback"),
    (lambda ms: ms[1]["inputs"]["s"].update(layer="same", fallback=None), "modules[1].inputs.s", "runs after 'ladder'"),
    (lambda ms: ms[1]["inputs"].update(z2={"module": "side_attn"}), "modules[1].inputs.z2", "a cycle"),
    (lambda ms: ms[4].update(sites=["final.norm"], layers="all"), "modules[4].inputs.s.layer", "read a per-layer source with layer: last"),
    (lambda ms: ms[2].update(compute="z + linear(h, Wq)"), "modules[2].compute", "linear: input width 512 does not match weight [64, 64]"),
    (lambda ms: ms[3].update(compute="a + linear(gelu(linear(h, W1, b1)), W2, b2)"), "modules[3].compute", "linear: input width 512"),
])
def test_connections_that_cannot_run_are_located_errors(tmp_path: Any, change: Any, field: str, message: str) -> None:
    spec = _lst_with(change)
    if spec["modules"][1]["inputs"]["s"].get("fallback", 0) is None:
        del spec["modules"][1]["inputs"]["s"]["fallback"]
    problems = _problems(tmp_path, spec)
    assert problems, "expected a problem"
    p = problems[0]
    assert p.field == field and message in p.message, "\n".join(map(str, problems))
    assert p.location.line > 1


def test_typology_shows_the_interactions() -> None:
    t = derive_typology(CAT.technique("ladder_side_tuning"), CAT.reference, CAT.techniques)
    assert "carried layer to layer" in t.values["inter_connectivity"]
    assert "reads another module" in t.values["inter_connectivity"]
    assert "carried" not in derive_typology(CAT.technique("lora"), CAT.reference, CAT.techniques).values["inter_connectivity"]
