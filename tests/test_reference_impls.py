"""Techniques that HF peft does not implement, checked against plain-torch implementations of their papers.

For each technique and each of tiny Llama, GPT-2 and BERT: one seeded base
model is deep-copied; pefref applies the technique to one copy and its
adapter weights are made non-trivial; the other copy runs the paper's
equations, written here by hand in plain torch (matmuls, explicit Kronecker
products, an explicit softmax attention, Gram-Schmidt for an orthonormal
basis) with forward hooks on the model's own modules (paths written in this
file, not read from pefref's architecture maps), reading the same tensors.
Prefixes go through the model's key/value cache and prompts through
``inputs_embeds``, as HF models take them. Outputs agree within 1e-5 in fp32,
eval mode; trainable counts equal the papers' formulas; mergeable techniques'
merged weights equal the closed form.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pefref.language.catalog import default_catalog
from pefref.models.build import build_model
from pefref.ops import PRIMITIVES
from pefref.runtime.api import Adapter, apply
from pefref.view.analysis import mergeable
from pefref.view.typology import derive_typology

from .parity import cache_kw

TOL = 1e-5
CATALOG = default_catalog()
SHAPES = ["tiny-llama", "tiny-gpt2", "tiny-bert"]
Fn = Callable[..., torch.Tensor]

# --- where things are in each family (independent of pefref's architecture maps) -------------

# sublayer: (module whose input is x, module whose output is h); linear sites: (module, output slice)
PATHS: dict[str, dict[str, Any]] = {
    "llama": {
        "attn": ("model.layers.{i}.self_attn", "model.layers.{i}.self_attn"),
        "ffn": ("model.layers.{i}.mlp", "model.layers.{i}.mlp"),
        "layer": "model.layers.{i}",
        "q": ("model.layers.{i}.self_attn.q_proj", None),
        "v": ("model.layers.{i}.self_attn.v_proj", None),
        "down": "model.layers.{i}.mlp.down_proj",
        "embed": "model.embed_tokens",
    },
    "gpt2": {
        "attn": ("transformer.h.{i}.attn", "transformer.h.{i}.attn"),
        "ffn": ("transformer.h.{i}.mlp", "transformer.h.{i}.mlp"),
        "layer": "transformer.h.{i}",
        "q": ("transformer.h.{i}.attn.c_attn", (0, 32)),  # fused c_attn: q, k, v slices of 32
        "v": ("transformer.h.{i}.attn.c_attn", (64, 96)),
        "down": "transformer.h.{i}.mlp.c_proj",
        "embed": "transformer.wte",
    },
    "bert": {
        "attn": ("encoder.layer.{i}.attention", "encoder.layer.{i}.attention.output.dense"),
        "ffn": ("encoder.layer.{i}.intermediate", "encoder.layer.{i}.output.dense"),
        "layer": "encoder.layer.{i}",
        "q": ("encoder.layer.{i}.attention.self.query", None),
        "v": ("encoder.layer.{i}.attention.self.value", None),
        "down": "encoder.layer.{i}.output.dense",
        "embed": "embeddings.word_embeddings",
    },
}
CAUSAL = {"llama": True, "gpt2": True, "bert": False}


@functools.cache
def _base(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


def family_of(shape: str) -> str:
    return CATALOG.shape(shape).family


def inputs_for(fam: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    if fam == "bert":
        mask[1, -2:] = 0  # padding on the encoder
    return {"input_ids": ids, "attention_mask": mask}


def output_of(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if t is not None:
            return t
    raise AssertionError("no logits / last_hidden_state")


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and torch.is_tensor(args[0]):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if torch.is_tensor(v))


# --- the hand-written side ---------------------------------------------------------------------


@dataclass
class Hand:
    """The plain-torch model: hooks on a copy of the base model, plus prefix / prompt inputs."""

    model: nn.Module
    fam: str
    L: int
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer ([n, kvh*dh], [n, kvh*dh])
    prompt: torch.Tensor | None = None  # [n, d]
    handles: list[Any] = field(default_factory=list)
    mask: torch.Tensor | None = None  # the attention mask of the current run (prepended positions included)
    cache: Any = None  # the key/value cache of the current run (prefixes)

    def path(self, key: str, i: int) -> Any:
        p = PATHS[self.fam][key]
        return p.format(i=i) if isinstance(p, str) else (p[0].format(i=i), *p[1:]) if key in ("q", "v") else tuple(s.format(i=i) for s in p)

    def sublayer(self, key: str, i: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """fn(x, h) -> new h at a whole sublayer ('attn', 'ffn') or layer ('layer')."""
        if key == "layer":
            m_in = m_out = self.model.get_submodule(self.path("layer", i))
        else:
            p_in, p_out = self.path(key, i)
            m_in, m_out = self.model.get_submodule(p_in), self.model.get_submodule(p_out)
        store: dict[str, torch.Tensor] = {}

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            store["x"] = _first_tensor(args, kwargs)

        def post(_m: nn.Module, _a: Any, _k: Any, out: Any) -> Any:
            if isinstance(out, tuple):
                return (fn(store["x"], out[0]), *out[1:])
            return fn(store["x"], out)

        self.handles.append(m_in.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(m_out.register_forward_hook(post, with_kwargs=True))

    def linear(self, key: str, i: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """fn(x, h) -> new h at a projection ('q', 'v'); on GPT-2 a slice of the fused c_attn."""
        p, sl = self.path(key, i)

        def post(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if sl is None:
                return fn(x, out)
            a, b = sl
            return torch.cat([out[..., :a], fn(x, out[..., a:b]), out[..., b:]], dim=-1)

        self.handles.append(self.model.get_submodule(p).register_forward_hook(post))

    def down_input(self, i: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """fn(a) -> new a on the FFN activation entering the down projection."""

        def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (fn(args[0]), *args[1:])

        self.handles.append(self.model.get_submodule(self.path("down", i)).register_forward_pre_hook(pre))

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        kw = dict(inputs)
        b = kw["input_ids"].shape[0]
        extra = 0
        if self.prompt is not None:
            emb = self.model.get_submodule(PATHS[self.fam]["embed"])(kw.pop("input_ids"))
            kw["inputs_embeds"] = torch.cat([self.prompt.unsqueeze(0).expand(b, -1, -1), emb], dim=1)
            extra += self.prompt.shape[0]
        if self.prefix is not None:
            from transformers import DynamicCache

            sizes = model_sizes(self.fam)
            layers = []
            for k, v in self.prefix:
                n = k.shape[0]
                to4 = lambda t: t.reshape(n, sizes["kv_heads"], sizes["d_head"]).permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)  # noqa: E731
                layers.append((to4(k), to4(v)))
            kw[cache_kw(self.model)] = self.cache = DynamicCache(layers)
            extra += self.prefix[0][0].shape[0]
        if extra:
            m = kw["attention_mask"]
            kw["attention_mask"] = torch.cat([torch.ones(b, extra, dtype=m.dtype), m], dim=1)
        self.mask = kw["attention_mask"]
        out = output_of(self.model(**kw))
        return out[:, out.shape[1] - inputs["input_ids"].shape[1]:]


def model_sizes(fam: str) -> dict[str, int]:
    if fam == "llama":
        return {"d": 32, "d_ff": 64, "L": 2, "heads": 4, "kv_heads": 2, "d_head": 8}
    if fam == "gpt2":
        return {"d": 32, "d_ff": 128, "L": 2, "heads": 4, "kv_heads": 4, "d_head": 8}
    return {"d": 32, "d_ff": 64, "L": 2, "heads": 4, "kv_heads": 4, "d_head": 8}


class Units:
    """Reads the tensors of pefref's units (the weights both sides share)."""

    def __init__(self, a: Adapter) -> None:
        self.a = a

    def __call__(self, module: str, site: str, layer: int | None = None) -> Callable[[str], torch.Tensor]:
        key = f"{module}__{site.replace('.', '_')}" + ("" if layer is None else f"__{layer}")
        unit = self.a.units[key]
        return lambda name: unit.own(name).detach()  # a stacked tensor's slice of this layer


# --- the papers' equations, in plain torch ----------------------------------------------------


def bottleneck(h: torch.Tensor, Wd: torch.Tensor, bd: torch.Tensor, Wu: torch.Tensor, bu: torch.Tensor, act: Fn) -> torch.Tensor:
    """up(act(down(h))): the bottleneck adapter of Houlsby et al. / Pfeiffer et al. / He et al."""
    return act(h @ Wd.T + bd) @ Wu.T + bu


def phm(A: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Compacter's PHM weight: sum_i A_i ⊗ (s_i t_i), built with explicit Kronecker products."""
    return sum(torch.kron(A[i], s[i] @ t[i]) for i in range(A.shape[0]))


def compacter_delta(h: torch.Tensor, g: Callable[[str], torch.Tensor]) -> torch.Tensor:
    down = phm(g("A"), g("sd"), g("td"))  # [r, d]
    up = phm(g("A"), g("su"), g("tu"))  # [d, r]
    return F.gelu(h @ down.T + g("bd")) @ up.T + g("bu")


def tiny_attention(x: torch.Tensor, g: Callable[[str], torch.Tensor], heads: int, causal: bool, mask: torch.Tensor) -> torch.Tensor:
    """Zhao et al.: multi-head attention with tiny heads over the sublayer input, then an output map.
    Padded keys (mask 0) are never attended to, not even by their own (padded) query; a query left with no key
    (padding before any real token under a causal mask) gives zeros."""
    q, k, v = x @ g("Wq").T, x @ g("Wk").T, x @ g("Wv").T  # [b, s, r]
    b, s, r = q.shape
    dh = r // heads
    split = lambda t: t.reshape(b, s, heads, dh).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / dh ** 0.5  # [b, H, s, s]
    blocked = ~mask.bool()[:, None, None, :]  # [b, 1, 1, s]
    if causal:
        blocked = blocked | torch.ones(s, s, dtype=torch.bool).triu(1)
    blocked = blocked.expand(b, 1, s, s)
    none = blocked.all(-1, keepdim=True)  # queries with no key: zeros
    scores = scores.masked_fill(blocked, float("-inf")).masked_fill(none, 0.0)
    out = (torch.softmax(scores, dim=-1) @ split(v)).masked_fill(none, 0.0)
    return out.transpose(1, 2).reshape(b, s, r) @ g("Wo").T


def gram_schmidt_rows(P: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning P's rows, in order (classical Gram-Schmidt, twice for stability)."""
    rows: list[torch.Tensor] = []
    for p in P.double():
        for _ in range(2):
            for q in rows:
                p = p - (p @ q) * q
        rows.append(p / p.norm())
    return torch.stack(rows).to(P.dtype)


def loreft(h: torch.Tensor, g: Callable[[str], torch.Tensor], p: int, s: int) -> torch.Tensor:
    """Wu et al. eq. 2 at the first p and last s positions: h + R^T (W h + b - R h)."""
    R = gram_schmidt_rows(g("P"))
    edit = (h @ g("Wp").T + g("bp") - h @ R.T) @ R
    n = h.shape[1]
    pos = torch.arange(n)
    mask = ((pos < p) | (pos >= n - s)).to(h.dtype)[:, None]
    return h + mask * edit


def prefix_kv(g: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Li & Liang's reparameterised prefix: an MLP over the prefix matrix, one key and one value head per layer
    (stored as one [2*d_kv, hidden] head per layer, keys first)."""
    hidden = torch.tanh(g("E") @ g("W1").T + g("b1"))
    d_kv = g("Wkv").shape[0] // 2
    Wk, Wv, bk, bv = g("Wkv")[:d_kv], g("Wkv")[d_kv:], g("bkv")[:d_kv], g("bkv")[d_kv:]
    return hidden @ Wk.T + bk, hidden @ Wv.T + bv


def lora_delta(x: torch.Tensor, g: Callable[[str], torch.Tensor]) -> torch.Tensor:
    return x @ g("A").T @ g("B").T


# --- the cases -----------------------------------------------------------------------------------

# each builder gets (hand, units, family sizes, hyperparameters) and installs the paper's version
Builder = Callable[[Hand, Units, dict[str, int], dict[str, Any]], None]


def _houlsby(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    for i in range(h.L):
        for key, site in (("attn", "attn.block"), ("ffn", "ffn.block")):
            g = u("adapter", site, i)
            h.sublayer(key, i, lambda x, y, g=g: y + bottleneck(y, g("Wd"), g("bd"), g("Wu"), g("bu"), F.silu))


def _compacter(sites: tuple[str, ...]) -> Builder:
    def build(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
        for i in range(h.L):
            for key, site in (("attn", "attn.block"), ("ffn", "ffn.block")):
                if site in sites:
                    g = u("adapter", site, i)
                    h.sublayer(key, i, lambda x, y, g=g: y + compacter_delta(y, g))
    return build


def _tiny_attention(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    for i in range(h.L):
        g = u("tiny_attention", "attn.block", i)
        h.sublayer("attn", i, lambda x, y, g=g: y + tiny_attention(x, g, hp["heads"], CAUSAL[h.fam], h.mask))


def _pfeiffer(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    for i in range(h.L):
        g = u("adapter", "ffn.block", i)
        h.sublayer("ffn", i, lambda x, y, g=g: y + bottleneck(y, g("Wd"), g("bd"), g("Wu"), g("bu"), F.relu))


def _parallel(scale: float) -> Builder:
    def build(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
        for i in range(h.L):
            g = u("adapter", "ffn.block", i)
            h.sublayer("ffn", i, lambda x, y, g=g: y + scale * bottleneck(x, g("Wd"), g("bd"), g("Wu"), g("bu"), F.relu))
    return build


def _krona(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    for i in range(h.L):
        for key in ("q", "v"):
            g = u("krona", f"attn.{key}", i)
            h.linear(key, i, lambda x, y, g=g: y + hp["s"] * x @ torch.kron(g("A"), g("B")).T)


def _loreft(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    for i in range(h.L):
        g = u("intervention", "layer", i)
        h.sublayer("layer", i, lambda x, y, g=g: loreft(y, g, hp["p"], hp["s"]))


def _prefix(h: Hand, u: Units) -> None:
    h.prefix = [prefix_kv(u("prefix", "attn.kv", i)) for i in range(h.L)]


def _mam(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    _prefix(h, u)
    _parallel(hp["s"])(h, u, z, hp)


def _unipelt(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    _prefix(h, u)
    for i in range(h.L):  # the prefix gate (authors' code): G_P = mean_t sigmoid(W_gp x_t + b_gp), x the attention's input
        g = u("prefix", "attn.kv", i)

        def gate(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i, g: Any = g) -> None:
            x = _first_tensor(args, kwargs)
            G = torch.sigmoid(x @ g("Wgp").T + g("bgp")).mean(dim=1)[:, :, None, None]  # [batch, 1, 1, 1]
            layer = h.cache.layers[i]  # this layer's cache holds the prefix only until its attention runs
            layer.keys, layer.values = G * layer.keys, G * layer.values

        h.handles.append(h.model.get_submodule(PATHS[h.fam]["attn"][0].format(i=i)).register_forward_pre_hook(gate, with_kwargs=True))
    scale = hp["alpha"] / hp["r"]
    for i in range(h.L):
        for key in ("q", "v"):
            g = u("lora", f"attn.{key}", i)
            h.linear(key, i, lambda x, y, g=g: y + torch.sigmoid(x @ g("Wg").T + g("bg")) * scale * lora_delta(x, g))
        g = u("adapter", "ffn.block", i)
        h.sublayer("ffn", i, lambda x, y, g=g: y + torch.sigmoid(y @ g("Wg").T + g("bg"))
                   * bottleneck(y, g("Wd"), g("bd"), g("Wu"), g("bu"), F.relu))


def _channel_gated_lora(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    scale = hp["alpha"] / hp["r"]
    for i in range(h.L):
        for key in ("q", "v"):
            g = u("lora", f"attn.{key}", i)
            h.linear(key, i, lambda x, y, g=g: y + scale * g("g") * lora_delta(x, g))


def _kron_prompt(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    g = u("prompt", "embed.output")
    U, V = g("U"), g("V")
    h.prompt = sum(torch.kron(U[i], V[i]) for i in range(U.shape[0]))


def _act_lora(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    scale = hp["alpha"] / hp["r"]
    for i in range(h.L):
        g = u("act_lora", "ffn.act", i)
        h.down_input(i, lambda a, g=g: a + scale * lora_delta(a, g))


def _svd_frame(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD W = U diag(S) V^T of a host weight, in fp32 (singular values descending)."""
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    return U, S, Vh


def _lora_xs(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    scale, r = hp["alpha"] / hp["r"], hp["r"]
    for i in range(h.L):
        for key in ("q", "v"):
            U, S, Vh = _svd_frame(_host_weight(h.model, h.fam, key, i))
            R = u("lora_xs", f"attn.{key}", i)("R")
            dW = U[:, :r] @ R @ torch.diag(S[:r]) @ Vh[:r]  # the paper's U_r S_r R V_r^T of the [in, out] weight, transposed
            h.linear(key, i, lambda x, y, dW=dW: y + scale * x @ dW.T)


def _milora(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    scale, r = hp["alpha"] / hp["r"], hp["r"]
    for i in range(h.L):
        for key in ("q", "v"):
            U, S, Vh = _svd_frame(_host_weight(h.model, h.fam, key, i))
            minor = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]  # the residual base is W - minor
            g = u("milora", f"attn.{key}", i)
            h.linear(key, i, lambda x, y, g=g, m=minor: y - x @ m.T + scale * lora_delta(x, g))


def _nola(h: Hand, u: Units, z: dict[str, int], hp: dict[str, Any]) -> None:
    scale = hp["alpha"] / hp["r"]
    for i in range(h.L):
        for key in ("q", "v"):
            g = u("nola", f"attn.{key}", i)
            A = sum(g("c")[j] * g("A_basis")[j] for j in range(hp["k"]))
            B = sum(g("b")[j] * g("B_basis")[j] for j in range(hp["k"]))
            h.linear(key, i, lambda x, y, A=A, B=B: y + scale * x @ A.T @ B.T)


def _bn(d: int, r: int) -> int:
    """Parameters of one bottleneck adapter d -> r -> d with biases."""
    return 2 * d * r + r + d


def _phm(n: int, d: int, r: int) -> int:
    """Per-layer parameters of one Compacter adapter (rule matrices counted apart)."""
    return n * (r // n) + n * (d // n) + r + n * (d // n) + n * (r // n) + d


@dataclass
class Case:
    tid: str
    build: Builder
    count: Callable[[dict[str, int], dict[str, Any], str], int]  # the paper's parameter count
    hps: dict[str, Any] = field(default_factory=dict)  # overrides passed to apply (besides defaults)


def _v_out(z: dict[str, int]) -> int:
    return z["kv_heads"] * z["d_head"]


CASES = [
    Case("houlsby_adapter", _houlsby, lambda z, hp, f: z["L"] * 2 * _bn(z["d"], hp["r"])),
    Case("compacter", _compacter(("attn.block", "ffn.block")),
         lambda z, hp, f: hp["n"] ** 3 + z["L"] * 2 * _phm(hp["n"], z["d"], hp["r"])),  # one set of rule matrices
    Case("tiny_attention_adapter", _tiny_attention, lambda z, hp, f: z["L"] * 4 * z["d"] * hp["r"]),
    Case("pfeiffer_adapter", _pfeiffer, lambda z, hp, f: z["L"] * _bn(z["d"], hp["r"])),
    Case("parallel_adapter", _parallel(1.0), lambda z, hp, f: z["L"] * _bn(z["d"], hp["r"])),
    Case("scaled_parallel_adapter", lambda h, u, z, hp: _parallel(hp["s"])(h, u, z, hp), lambda z, hp, f: z["L"] * _bn(z["d"], hp["r"])),
    Case("compacter_pp", _compacter(("ffn.block",)), lambda z, hp, f: hp["n"] ** 3 + z["L"] * _phm(hp["n"], z["d"], hp["r"])),
    Case("krona", _krona, lambda z, hp, f: z["L"] * sum(
        hp["a_out"] * hp["a_in"] + (o // hp["a_out"]) * (z["d"] // hp["a_in"]) for o in (z["heads"] * z["d_head"], _v_out(z)))),
    Case("loreft", _loreft, lambda z, hp, f: z["L"] * (2 * hp["r"] * z["d"] + hp["r"])),
    Case("loreft", _loreft, lambda z, hp, f: z["L"] * (2 * hp["r"] * z["d"] + hp["r"]), {"r": 3, "p": 1, "s": 3}),
    Case("mam_adapter", _mam, lambda z, hp, f: _prefix_count(z, hp) + z["L"] * _bn(z["d"], hp["r"]), {"n": 6, "hidden": 16}),
    Case("unipelt", _unipelt, lambda z, hp, f: _prefix_count(z, hp) + z["L"] * (z["d"] + 1) + z["L"] * (
        sum(hp["r"] * z["d"] + o * hp["r"] + z["d"] + 1 for o in (z["heads"] * z["d_head"], _v_out(z)))
        + _bn(z["d"], hp["r_adapter"]) + z["d"] + 1), {"n": 6, "hidden": 16}),
    Case("channel_gated_lora", _channel_gated_lora, lambda z, hp, f: z["L"] * sum(
        hp["r"] * z["d"] + o * hp["r"] + o for o in (z["heads"] * z["d_head"], _v_out(z)))),
    Case("kron_prompt", _kron_prompt, lambda z, hp, f: hp["k"] * (hp["n"] * hp["a"] + z["d"] // hp["a"])),
    Case("act_lora", _act_lora, lambda z, hp, f: z["L"] * 2 * hp["r"] * z["d_ff"]),
    Case("lora_xs", _lora_xs, lambda z, hp, f: z["L"] * 2 * hp["r"] ** 2),
    Case("milora", _milora, lambda z, hp, f: z["L"] * sum(hp["r"] * (z["d"] + o) for o in (z["heads"] * z["d_head"], _v_out(z)))),
    Case("nola", _nola, lambda z, hp, f: z["L"] * 2 * 2 * hp["k"]),
    Case("nola", _nola, lambda z, hp, f: z["L"] * 2 * 2 * hp["k"], {"r": 4, "k": 5}),
]


def _prefix_count(z: dict[str, int], hp: dict[str, Any]) -> int:
    w = _v_out(z)  # prefix width: the key/value width
    return hp["n"] * w + hp["hidden"] * w + hp["hidden"] + z["L"] * 2 * (w * hp["hidden"] + w)


def _perturb(a: Adapter) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _setup(case: Case, shape: str) -> tuple[nn.Module, Adapter, Hand, dict[str, Any], dict[str, torch.Tensor], torch.Tensor]:
    fam = family_of(shape)
    model, ref = copy.deepcopy(_base(shape)), copy.deepcopy(_base(shape))
    inputs = inputs_for(fam)
    with torch.no_grad():
        base_out = output_of(ref(**inputs))
    a = apply(model, case.tid, **case.hps)
    _perturb(a)
    hand = Hand(ref, fam, model_sizes(fam)["L"])
    case.build(hand, Units(a), model_sizes(fam), a.hyperparameters)
    return model, a, hand, a.hyperparameters, inputs, base_out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.tid + ("-" + "-".join(f"{k}{v}" for k, v in c.hps.items()) if c.hps else ""))
def test_matches_plain_torch(case: Case, shape: str) -> None:
    model, a, hand, hp, inputs, base_out = _setup(case, shape)
    with torch.no_grad():
        ours = output_of(model(**inputs))
        ours = ours[:, ours.shape[1] - base_out.shape[1]:]
        theirs = hand.run(inputs)
    assert theirs.shape == base_out.shape
    assert (theirs - base_out).abs().max() > 1e-3, "the reference did not change the model: the check would be vacuous"
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"{case.tid} on {shape}: max abs diff {diff:.3g}"
    # the parameter count is the paper's
    assert a.report.trainable == case.count(model_sizes(hand.fam), hp, hand.fam)


# --- merged weights equal the closed form (mergeable techniques) ---------------------------------


def _host_weight(model: nn.Module, fam: str, key: str, i: int) -> torch.Tensor:
    """The [out, in] weight of a projection (GPT-2: a slice of the fused c_attn, or its c_proj)."""
    if key == "down":
        m = model.get_submodule(PATHS[fam]["down"].format(i=i))
        return m.weight.T if fam == "gpt2" else m.weight
    p, sl = PATHS[fam][key]
    m = model.get_submodule(p.format(i=i))
    if fam == "gpt2":
        return m.weight.T[sl[0]:sl[1]]
    return m.weight


MERGE = {
    # technique: (host key, closed form of W' from W and the unit's tensors)
    "krona": [(k, lambda W, g, hp: W + hp["s"] * torch.kron(g("A"), g("B"))) for k in ("q", "v")],
    "channel_gated_lora": [(k, lambda W, g, hp: W + (hp["alpha"] / hp["r"]) * g("g")[:, None] * (g("B") @ g("A"))) for k in ("q", "v")],
    "act_lora": [("down", lambda W, g, hp: W @ (torch.eye(W.shape[1]) + (hp["alpha"] / hp["r"]) * g("B") @ g("A")))],
    "lora_xs": [(k, lambda W, g, hp: W + (hp["alpha"] / hp["r"]) * g("B") @ g("R") @ g("A")) for k in ("q", "v")],
    "milora": [(k, lambda W, g, hp: W + (hp["alpha"] / hp["r"]) * g("B") @ g("A")) for k in ("q", "v")],  # W: the residual host
    "nola": [(k, lambda W, g, hp: W + (hp["alpha"] / hp["r"]) * torch.einsum("k,kor->or", g("b"), g("B_basis"))
              @ torch.einsum("k,kri->ri", g("c"), g("A_basis"))) for k in ("q", "v")],
}
UNIT_OF = {"krona": ("krona", "attn.{k}"), "channel_gated_lora": ("lora", "attn.{k}"), "act_lora": ("act_lora", "ffn.act"),
           "lora_xs": ("lora_xs", "attn.{k}"), "milora": ("milora", "attn.{k}"), "nola": ("nola", "attn.{k}")}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tid", sorted(MERGE))
def test_merged_weights_are_the_closed_form(tid: str, shape: str) -> None:
    fam = family_of(shape)
    model = copy.deepcopy(_base(shape))
    inputs = inputs_for(fam)
    a = apply(model, tid)
    _perturb(a)
    u = Units(a)
    with torch.no_grad():
        adapted = output_of(model(**inputs))
        expected = {}
        for i in range(model_sizes(fam)["L"]):
            for key, form in MERGE[tid]:
                mod, site = UNIT_OF[tid]
                g = u(mod, site.format(k=key), i)
                expected[(key, i)] = form(_host_weight(model, fam, key, i).clone(), g, a.hyperparameters)
        a.merge()
        for (key, i), W in expected.items():
            diff = (_host_weight(model, fam, key, i) - W).abs().max().item()
            assert diff <= TOL, f"{tid} on {shape}, {key}[{i}]: merged weight differs by {diff:.3g}"
        assert (output_of(model(**inputs)) - adapted).abs().max() <= TOL


# --- derived facts ---------------------------------------------------------------------------------

EXPECTED_TYPOLOGY = {
    "pfeiffer_adapter": {"workspace": "ffn", "insertion_form": "sequential", "integration_form": "direct addition", "insertions": "L"},
    "parallel_adapter": {"insertion_form": "parallel", "integration_form": "direct addition", "parameter_adaptation": "addition"},
    "scaled_parallel_adapter": {"insertion_form": "parallel", "integration_form": "scaled addition", "intra_connectivity": "dense"},
    "compacter_pp": {"workspace": "ffn", "intra_connectivity": "kronecker/hypercomplex", "parameter_sharing": "across layers", "insertions": "L"},
    "krona": {"insertion_form": "parallel", "integration_form": "scaled addition", "parameter_adaptation": "reparameterisation",
              "intra_connectivity": "kronecker/hypercomplex", "insertions": "2L"},
    "loreft": {"workspace": "layer", "insertion_form": "sequential", "intra_connectivity": "orthogonal", "inter_connectivity": "fixed",
               "input_type": "hidden states"},
    "mam_adapter": {"workspace": "attention + ffn", "integration_form": "concatenation + scaled addition", "insertions": "2L"},
    "unipelt": {"integration_form": "gated addition + concatenation", "parameter_adaptation": "addition", "insertions": "4L"},
    "channel_gated_lora": {"integration_form": "gated addition", "parameter_adaptation": "reparameterisation", "intra_connectivity": "low-rank"},
    "kron_prompt": {"workspace": "embedding", "integration_form": "concatenation", "intra_connectivity": "kronecker/hypercomplex", "input_type": "none"},
    "act_lora": {"workspace": "ffn", "insertion_form": "sequential", "parameter_adaptation": "reparameterisation", "intra_connectivity": "low-rank"},
    "lora_xs": {"insertion_form": "parallel", "integration_form": "scaled addition", "parameter_adaptation": "reparameterisation", "intra_connectivity": "low-rank", "insertions": "2L"},
    "milora": {"insertion_form": "parallel", "integration_form": "scaled addition", "parameter_adaptation": "reparameterisation", "intra_connectivity": "low-rank", "insertions": "2L"},
    "nola": {"insertion_form": "parallel", "integration_form": "scaled addition", "parameter_adaptation": "reparameterisation", "intra_connectivity": "low-rank", "insertions": "2L"},
}


@pytest.mark.parametrize("tid", sorted(EXPECTED_TYPOLOGY))
def test_typology_is_derived(tid: str) -> None:
    t = CATALOG.technique(tid)
    row = derive_typology(t, CATALOG.reference, CATALOG.techniques)
    assert row.declared == []
    for prop, value in EXPECTED_TYPOLOGY[tid].items():
        assert row.values[prop] == value, (tid, prop, row.values[prop])


def test_original_techniques_are_marked() -> None:
    for tid in ("channel_gated_lora", "kron_prompt", "act_lora"):
        t = CATALOG.technique(tid)
        assert t.original and t.summary and t.notes


def test_gates_that_read_the_input_forbid_merging() -> None:
    from pefref.language.check import expand_modules

    kinds = lambda m: [CATALOG.reference.sites[s].kind for s in m.sites]  # noqa: E731
    gated = {m.name: m for m in expand_modules(CATALOG.technique("unipelt"), CATALOG.techniques)[0]}
    assert not mergeable(gated["lora"], kinds(gated["lora"]))
    plain = expand_modules(CATALOG.technique("channel_gated_lora"), CATALOG.techniques)[0][0]
    assert mergeable(plain, kinds(plain))


# --- the primitives added for these techniques -------------------------------------------------------


def test_orthonormal_rows() -> None:
    f = PRIMITIVES["orthonormal_rows"].fn
    P = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    R = f(P)
    assert torch.allclose(R @ R.T, torch.eye(5), atol=1e-5)
    assert torch.allclose(R, gram_schmidt_rows(P.detach()), atol=1e-5)  # same rows, same signs
    R.sum().backward()
    assert P.grad is not None and torch.isfinite(P.grad).all()


def test_position_mask() -> None:
    f = PRIMITIVES["position_mask"].fn
    h = torch.zeros(2, 6, 3)
    assert f(h, 2, 1).squeeze(-1).tolist() == [1, 1, 0, 0, 0, 1]
    assert f(h, 0, 0).sum() == 0
    assert f(torch.zeros(1, 3, 4), 2, 2).squeeze(-1).tolist() == [1, 1, 1]  # overlapping ranges count once
    assert f(h, 1, 1).shape == (6, 1)


def test_kron_linear() -> None:
    g = torch.Generator().manual_seed(0)
    A, B, x = torch.randn(3, 4, generator=g), torch.randn(5, 2, generator=g), torch.randn(2, 7, 8, generator=g)
    assert torch.allclose(PRIMITIVES["kron_linear"].fn(x, A, B), x @ torch.kron(A, B).T, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_milora_residual_base_and_remove(shape: str) -> None:
    """MiLoRA's host weight is the residual W - U_m S_m V_m^T during the adapter's life and W, bit for bit, after remove()."""
    fam = family_of(shape)
    model = copy.deepcopy(_base(shape))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    a = apply(model, "milora")
    r = a.hyperparameters["r"]
    for i in range(model_sizes(fam)["L"]):
        for key in ("q", "v"):
            W = _host_weight(_base(shape), fam, key, i)
            U, S, Vh = _svd_frame(W)
            expected = W - U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]
            assert (_host_weight(model, fam, key, i) - expected).abs().max() <= TOL
    a.remove()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
