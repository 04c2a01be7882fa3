"""Initialisation from data: calibration statistics declared by modules, gathered by apply(..., calibration=).

* EVA (input_ipca, the streaming incremental PCA) against peft 0.21.2's init_lora_weights="eva" +
  initialize_lora_eva_weights (rho = 1) on several calibration batches of two sequences, some left-padded (the
  fits cycle over them several times, each placement stopping on its own), and on one batch: A, B, outputs at init
  and after randomising the adapter, trainable counts, remove() bit-exact; the passes the fits took;
* LoRA-GA against peft 0.21.2's preprocess_loraga + init_lora_weights="lora_ga" (defaults ArB2r, stable) on the
  same labelled batches, on models without dropout (peft averages the gradients in train mode), each randomised
  SVD drawn from a generator seeded with the same seed on both sides (peft draws from torch's global generator
  in module order, between its layers' own initialisations: the test seeds each of its torch.svd_lowrank calls);
* CorDA (IPM and KPM) against peft 0.21.2's preprocess_corda + init_lora_weights="corda" on the same
  calibration batches: A, B and the residual host weights, outputs at init (the base function) and after
  randomising the adapter (peft's perturbed A and B copied in), trainable counts, remove() bit-exact;
* the statistics themselves (input and output covariances, the loss gradient of a host weight) against a
  direct computation, with hooks, modes and requires_grad flags left as they were;
* refusals: no batches, empty batches, a batch that is not a dict (the model unchanged), and validate's
  checks of declared statistics (name clashes, kinds a site cannot give, fields that may not read them).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig, EvaConfig, LoraGAConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.eva import initialize_lora_eva_weights
from peft.tuners.lora.loraga import preprocess_loraga

from pefref.language.catalog import default_catalog, load_techniques
from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.runtime.api import apply
from pefref.runtime.applying import calibrate, plan
from pefref.runtime.ipca import IncrementalFit

from .parity import max_diff, padded_batch
from .test_parity_lora_family import host_paths, unit_key

TOL = 1e-5
CATALOG = default_catalog()
SHAPE = "tiny-llama"


def _batches(n: int = 4, seq: int = 9, labels: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (1, seq), generator=g)
        out.append({"input_ids": ids, **({"labels": ids} if labels else {})})
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _out(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.given_calibration
@pytest.mark.parametrize(("shape", "mode"), [("tiny-llama", "ipm"), ("tiny-llama", "kpm"), ("tiny-bert", "ipm"), ("tiny-qwen2", "kpm")])
def test_corda_matches_peft(shape: str, mode: str) -> None:
    base = build_model(shape, seed=0)
    batches = _batches()
    paths = host_paths("corda", shape)
    task = "FEATURE_EXTRACTION" if "bert" in shape else "CAUSAL_LM"
    cfg = peft.LoraConfig(task_type=task, target_modules=sorted(set(paths.values())), r=4, lora_alpha=8.0, lora_dropout=0.0,
                          init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode))
    theirs = copy.deepcopy(base)
    preprocess_corda(theirs, cfg, run_model=lambda: [theirs(**b) for b in batches])
    pm = peft.get_peft_model(theirs, cfg).eval()
    mine = copy.deepcopy(base)
    a = apply(mine, "corda", r=4, alpha=8.0, kpm=mode == "kpm", calibration=batches)
    for k, path in paths.items():
        layer, unit = pm.get_base_model().get_submodule(path), a.units[unit_key(*k)]
        assert max_diff(unit.A, layer.lora_A["default"].weight) <= TOL, path
        assert max_diff(unit.B, layer.lora_B["default"].weight) <= TOL, path
        assert max_diff(mine.get_submodule(path).weight, layer.base_layer.weight) <= TOL, path  # the residual
        assert max_diff(mine.get_submodule(path).weight, base.get_submodule(path).weight) > 1e-4, path
    x = padded_batch(shape)
    with torch.no_grad():
        assert max_diff(_out(mine, x), _out(base, x)) <= TOL  # the base function at initialisation
        torch.manual_seed(1)
        for k, path in paths.items():  # randomise peft's adapter and copy it in
            layer, unit = pm.get_base_model().get_submodule(path), a.units[unit_key(*k)]
            for name, lora in (("A", layer.lora_A["default"].weight), ("B", layer.lora_B["default"].weight)):
                lora.add_(0.3 * torch.randn_like(lora))
                getattr(unit, name).copy_(lora)
        want, got = _out(pm, x), _out(mine, x)
        assert max_diff(got, want) <= TOL
        assert max_diff(got, _out(base, x)) > 1e-3  # the adapter changes the output
    assert a.report.trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    a.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in mine.state_dict().items())  # the base weights come back exactly


def _randomise_and_compare(pm: torch.nn.Module, mine: torch.nn.Module, base: torch.nn.Module, a, paths, shape: str) -> None:
    """Outputs at init equal the base model's; after peft's A and B are perturbed and copied in, both agree and differ from it."""
    x = padded_batch(shape)
    with torch.no_grad():
        assert max_diff(_out(mine, x), _out(base, x)) <= TOL  # the base function at initialisation
        torch.manual_seed(1)
        for k, path in paths.items():
            layer, unit = pm.get_base_model().get_submodule(path), a.units[unit_key(*k)]
            for name, lora in (("A", layer.lora_A["default"].weight), ("B", layer.lora_B["default"].weight)):
                lora.add_(0.3 * torch.randn_like(lora))
                getattr(unit, name).copy_(lora)
        got = _out(mine, x)
        assert max_diff(got, _out(pm, x)) <= TOL
        assert max_diff(got, _out(base, x)) > 1e-3  # the adapter changes the output


def _padded_batches(n: int = 4, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of two sequences of ``seq`` tokens; in every other batch the first sequence is left-padded."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(3, 100, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        if i % 2 == 0:
            mask[0, : 1 + i // 2] = 0
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.given_calibration
@pytest.mark.parametrize(("shape", "r", "n", "labelled"), [("tiny-llama", 4, 4, False), ("tiny-bert", 4, 4, False), ("tiny-qwen2", 2, 4, True),
                                                     ("tiny-llama", 8, 1, False)])
def test_eva_matches_peft(shape: str, r: int, n: int, labelled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    base = build_model(shape, seed=0)
    batches = _padded_batches(n) if n > 1 else _batches(1, seq=16)
    if labelled:  # tokens labelled -100 are left out too (peft's use_label_mask)
        for i, cut in ((1, slice(0, 3)), (3, slice(5, None))):
            batches[i]["labels"] = batches[i]["input_ids"].clone()
            batches[i]["labels"][i % 2, cut] = -100
    fits: list[IncrementalFit] = []
    update = IncrementalFit.update

    def counted(self: IncrementalFit, x: torch.Tensor) -> None:
        fits.append(self)
        update(self, x)

    monkeypatch.setattr(IncrementalFit, "update", counted)
    paths = host_paths("eva", shape)
    task = "FEATURE_EXTRACTION" if "bert" in shape else "CAUSAL_LM"
    cfg = peft.LoraConfig(task_type=task, target_modules=sorted(set(paths.values())), r=r, lora_alpha=8.0, lora_dropout=0.0,
                          init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
    pm.eval()
    mine = copy.deepcopy(base)
    a = apply(mine, "eva", r=r, alpha=8.0, calibration=batches)
    per_fit = {id(f): sum(g is f for g in fits) for f in fits}
    assert len(per_fit) == len(paths) and min(per_fit.values()) > n  # each placement's fit, over more than one pass
    if n > 1:
        assert len(set(per_fit.values())) > 1  # the placements stop on their own
    for k, path in paths.items():
        layer, unit = pm.get_base_model().get_submodule(path), a.units[unit_key(*k)]
        assert max_diff(unit.A, layer.lora_A["default"].weight) <= TOL, path
        assert torch.equal(unit.B, layer.lora_B["default"].weight) and not unit.B.any(), path
    _randomise_and_compare(pm, mine, base, a, paths, shape)
    assert a.report.trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    a.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in mine.state_dict().items())


@contextlib.contextmanager
def _seeded_svd_lowrank(seed: int) -> Iterator[None]:
    """torch.svd_lowrank drawing from a generator seeded with ``seed`` at every call (as pefref's svd ops with a seed)."""
    real = torch.svd_lowrank

    def seeded(a: torch.Tensor, q: int | None = 6, niter: int = 2, M: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return real(a, q=q, niter=niter, M=M)

    torch.svd_lowrank = seeded  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.svd_lowrank = real


@pytest.mark.given_calibration
@pytest.mark.parametrize(("shape", "r", "direction"), [("tiny-llama", 4, "ArB2r"), ("tiny-llama", 2, "A2rBr"), ("tiny-qwen2", 4, "ArB2r")])
def test_lora_ga_matches_peft(shape: str, r: int, direction: str) -> None:
    base = build_model(shape, seed=0)
    batches = _batches(3, labels=True)
    paths = host_paths("lora_ga", shape)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=sorted(set(paths.values())), r=r, lora_alpha=8.0, lora_dropout=0.0,
                          init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(direction=direction))
    theirs = copy.deepcopy(base)
    preprocess_loraga(theirs, cfg, train_step=lambda: [theirs(**b).loss.backward() for b in batches])
    with _seeded_svd_lowrank(5):
        pm = peft.get_peft_model(theirs, cfg).eval()
    mine = copy.deepcopy(base)
    a = apply(mine, "lora_ga", r=r, alpha=8.0, seed=5, a_leading=direction == "ArB2r", calibration=batches)
    for k, path in paths.items():
        layer, unit = pm.get_base_model().get_submodule(path), a.units[unit_key(*k)]
        assert max_diff(unit.A, layer.lora_A["default"].weight) <= TOL, path
        assert max_diff(unit.B, layer.lora_B["default"].weight) <= TOL, path
        assert max_diff(mine.get_submodule(path).weight, layer.base_layer.weight) <= TOL, path  # the residual
        assert max_diff(mine.get_submodule(path).weight, base.get_submodule(path).weight) > 1e-5, path
    _randomise_and_compare(pm, mine, base, a, paths, shape)
    assert a.report.trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    a.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in mine.state_dict().items())


_STATS = """
id: calib_probe
name: Calibration probe
paper: {title: "t", authors: "a", year: 2024, arxiv: "2406.05223"}
hyperparameters:
  r: {type: int, default: 2, min: 1}
modules:
  - name: probe
    sites: [attn.o, ffn.down]
    form: parallel
    calibration:
      Cx: {kind: input_cov, average: tokens}
      Ch: {kind: output_cov, normalise: batch_max, average: none}
      G: {kind: weight_grad}
      Px: {kind: input_pca}
    params:
      A: {shape: [r, d_in], init: "narrow(Cx, 0, 0, r) + narrow(G, 0, 0, r)"}
      B: {shape: [d_out, r], init: "narrow(Ch, 1, 0, r)"}
    compute: linear(linear(x, A), B)
"""


def _tech(tmp_path: Path, text: str):
    p = tmp_path / "calib_probe.yaml"
    p.write_text(text)
    loaded, _src, _pos, problems = load_techniques([p], CATALOG.reference, CATALOG.techniques)
    return loaded.get("calib_probe"), problems


@pytest.mark.given_calibration
def test_statistics_match_a_direct_computation(tmp_path: Path) -> None:
    tech, problems = _tech(tmp_path, _STATS)
    assert not problems and tech is not None
    model = build_model(SHAPE, seed=0)
    model.train()
    before, hooks = _state(model), _hooks(model)
    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    batches = _batches(3, labels=True)
    p = plan(model, tech, CATALOG)
    calibrate(model, p, batches)
    assert _hooks(model) == hooks and model.training and all(m.training for m in model.modules())
    assert {n: q.requires_grad for n, q in model.named_parameters()} == flags
    assert all(q.grad is None for q in model.parameters())  # gradients taken with autograd.grad, none written
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    i = next(i for i, pl in enumerate(p.places) if pl.site == "ffn.down" and pl.layer == 1)
    host = p.places[i].host
    xs, hs, gs = [], [], []

    def record(_m: torch.nn.Module, a: tuple[torch.Tensor, ...], o: torch.Tensor) -> None:
        xs.append(a[0].detach().reshape(-1, a[0].shape[-1]))
        hs.append(o.detach().reshape(-1, o.shape[-1]))

    h1 = host.register_forward_hook(record)
    model.eval()
    for b in batches:
        loss = model(**b).loss
        gs.append(torch.autograd.grad(loss, host.weight)[0])
    h1.remove()
    stats = p.stats[i]
    assert max_diff(stats["Cx"], sum(x.T @ x for x in xs) / sum(x.shape[0] for x in xs)) <= TOL
    assert max_diff(stats["Ch"], sum((h / h.max().abs()).T @ (h / h.max().abs()) for h in hs)) <= TOL
    assert max_diff(stats["G"], sum(gs) / len(gs)) <= TOL and stats["G"].abs().max() > 0
    xc = torch.cat(xs).double() - torch.cat(xs).double().mean(0)  # the principal axes: SVD of the centred inputs, svd_flip'd
    vh = torch.linalg.svd(xc, full_matrices=False)[2]
    vh = vh * torch.sign(vh[torch.arange(vh.shape[0]), vh.abs().argmax(1)])[:, None]
    k = 3  # leading axes with distinct variances (the centred inputs of 3 batches of 9 tokens have rank <= 26)
    assert max_diff(stats["Px"][:k], vh[:k].float()) <= TOL and stats["Px"].shape == (xc.shape[1], xc.shape[1])
    ad = apply(model, tech, calibration=batches)  # the initialisers read them
    unit = ad.units[f"probe__ffn_down__{1}"]
    assert max_diff(unit.B, stats["Ch"][:, :2]) <= TOL


@pytest.mark.given_calibration
def test_refusals_leave_the_model_unchanged() -> None:
    model = build_model(SHAPE, seed=0)
    before, hooks = _state(model), _hooks(model)
    with pytest.raises(PefrefError, match=r"corda.*calibration statistics C \(input_cov\).*calibration=batches"):
        apply(model, "corda")
    with pytest.raises(PefrefError, match="calibration batches are empty"):
        apply(model, "corda", calibration=[])
    with pytest.raises(PefrefError, match="dict of model inputs"):
        apply(model, "corda", calibration=[torch.zeros(1, 3, dtype=torch.long)])  # type: ignore[list-item]
    with pytest.raises(PefrefError, match="with labels"):
        apply(model, _probe(), calibration=_batches(2))
    assert _hooks(model) == hooks and not hasattr(model, "pefref_adapters")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(q.requires_grad for q in model.parameters())
    apply(model, "lora")  # a technique that declares nothing needs no batches


def _probe():
    import yaml

    from pefref.language.schema import Technique

    return Technique.model_validate(yaml.safe_load(_STATS))


@pytest.mark.parametrize(("change", "message"), [
    (("Cx: {kind: input_cov", "r: {kind: input_cov"), "statistic 'r': the name is already a size or hyperparameter"),
    (("Cx: {kind: input_cov", "A: {kind: input_cov"), "statistic 'A': the name is already a tensor of the module"),
    (("G: {kind: weight_grad}", "G: {kind: weight_grad, normalise: batch_max}"), "normalise applies to covariances"),
    (("compute: linear(linear(x, A), B)", "compute: linear(linear(x, A), B) + linear(x, Cx)"), "Cx"),
    (("kind: output_cov", "kind: activations"), "output_cov"),
])
def test_validate_checks_statistics(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    tech, problems = _tech(tmp_path, _STATS.replace(*change))
    assert tech is None or problems
    assert any(message in p.message for p in problems), [p.message for p in problems]


_IPCA = """
id: ipca_probe
name: IPCA probe
paper: {title: "t", authors: "a", year: 2024, arxiv: "2410.07170"}
hyperparameters:
  r: {type: int, default: 2, min: 1}
modules:
  - name: probe
    sites: [attn.o]
    form: parallel
    calibration:
      P: {kind: input_ipca, components: r}
    params:
      A: {shape: [r, d_in], init: "narrow(P, 0, 0, r)"}
      B: {shape: [d_out, r], init: zeros()}
    compute: linear(linear(x, A), B)
"""


@pytest.mark.parametrize(("change", "message"), [
    (("P: {kind: input_ipca, components: r}", "P: {kind: input_ipca}"), "give components"),
    (("components: r}", "components: rr}"), "unknown name 'rr'"),
    (("components: r}", "components: r, q: 2 * s}"), "unknown name 's'"),
    (("P: {kind: input_ipca, components: r}", "P: {kind: input_cov, components: r}"), "input_ipca's options"),
    (("components: r}", "components: r, tau: 1.5}"), "less than or equal to 1"),
])
def test_validate_checks_incremental_pca_options(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    p = tmp_path / "ipca_probe.yaml"
    p.write_text(_IPCA.replace(*change))
    loaded, _src, _pos, problems = load_techniques([p], CATALOG.reference, CATALOG.techniques)
    assert loaded.get("ipca_probe") is None or problems
    assert any(message in p.message for p in problems), [p.message for p in problems]


@pytest.mark.given_calibration
@pytest.mark.parametrize(("change", "batches", "message"), [
    (("components: r}", "components: 10}"), 2, "no calibration batch has that many tokens"),
    (("components: r}", "components: 2 * d_in}"), 2, "principal axes asked of inputs of width"),
])
def test_incremental_pca_refusals_leave_the_model_unchanged(tmp_path: Path, change: tuple[str, str], batches: int, message: str) -> None:
    p = tmp_path / "ipca_probe.yaml"
    p.write_text(_IPCA.replace(*change))
    model = build_model(SHAPE, seed=0)
    before, hooks = _state(model), _hooks(model)
    data = _batches(batches) if "d_in" not in change[1] else [{"input_ids": torch.randint(3, 100, (4, 40))}]
    with pytest.raises(PefrefError, match=message):
        apply(model, p, calibration=data)
    assert _hooks(model) == hooks and not hasattr(model, "pefref_adapters")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    p.write_text(_IPCA)
    ok = apply(model, p, calibration=_batches(3))  # the default bound: the fits converge
    assert ok.units["probe__attn_o__0"].A.shape == (2, model.config.hidden_size)


@pytest.mark.given_calibration
def test_an_unconverged_incremental_pca_keeps_its_last_estimate_with_a_warning(tmp_path: Path) -> None:
    """As scikit-learn does (peft would cycle on forever): after max_cycles passes the fit stops, warns with the
    placement, and its estimate initialises the adapter."""
    from pefref.runtime.calibration import ConvergenceWarning

    p = tmp_path / "ipca_probe.yaml"
    p.write_text(_IPCA.replace("components: r}", "components: r, tau: 1.0, max_cycles: 2}"))
    model = build_model(SHAPE, seed=0)
    with pytest.warns(ConvergenceWarning, match="has not converged .* after 2 passes .* last estimate is used"):
        adapter = apply(model, p, calibration=_batches(3))
    a = adapter.units["probe__attn_o__0"].A
    assert a.shape == (2, model.config.hidden_size) and torch.isfinite(a).all() and bool(a.abs().sum() > 0)


@pytest.mark.given_calibration
def test_incremental_pca_leaves_out_masked_tokens(tmp_path: Path) -> None:
    """A batch's masked tokens (attention mask 0, or label -100) are not fitted: the rows a fit sees are the kept ones."""
    p = tmp_path / "ipca_probe.yaml"
    p.write_text(_IPCA)
    model = build_model(SHAPE, seed=0)
    batches = _padded_batches(4)
    batches[1]["labels"] = batches[1]["input_ids"].clone()
    batches[1]["labels"][1, :3] = -100
    seen: list[int] = []
    update = IncrementalFit.update

    def counted(self: IncrementalFit, x: torch.Tensor) -> None:
        seen.append(x.shape[0])
        update(self, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(IncrementalFit, "update", counted)
        apply(model, p, calibration=batches)
    kept = [int(b["attention_mask"].sum()) - (3 if "labels" in b else 0) for b in batches]
    L = model.config.num_hidden_layers
    assert seen[: 4 * L] == [k for k in kept for _ in range(L)]


def test_typology_shows_initialisation_from_data() -> None:
    from pefref.view.typology import derive_typology

    row = derive_typology(CATALOG.technique("corda"), CATALOG.reference, CATALOG.techniques)
    assert row.values["initialisation"] == "calibration data"
    assert derive_typology(CATALOG.technique("pissa"), CATALOG.reference, CATALOG.techniques).values["initialisation"] == "host weights"
    assert derive_typology(CATALOG.technique("lora"), CATALOG.reference, CATALOG.techniques).values["initialisation"] == "data-free"


@pytest.mark.given_calibration
def test_a_composition_passes_calibration_batches_to_its_members(tmp_path: Path) -> None:
    p = tmp_path / "corda_ia3.yaml"
    p.write_text("id: corda_ia3\nname: CorDA and IA3\ntechniques:\n  - {name: corda, technique: corda, hyperparameters: {r: 2}}\n"
                 "  - {name: ia3, technique: ia3}\nblocks: []\n")
    model = build_model(SHAPE, seed=0)
    before = _state(model)
    with pytest.raises(PefrefError, match="calibration=batches"):
        apply(model, p)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    comp = apply(model, p, calibration=_batches(2))
    assert set(comp.adapters) == {"corda", "ia3"}  # type: ignore[union-attr]


def test_show_derives_costs_of_a_technique_initialised_from_data() -> None:
    """Counts and per-token costs are derived on the meta device: statistics there are empty tensors of their shapes."""
    import json

    from typer.testing import CliRunner

    from pefref.cli.app import app

    r = CliRunner().invoke(app, ["show", "corda", "--json", "--model", "tiny-llama"])
    assert r.exit_code == 0, r.output
    facts = json.loads(r.output)
    assert facts["parameters"]["trainable"] == 6656 and facts["efficiency"]["mergeable"] is True
    assert facts["typology"]["initialisation"] == "calibration data"
