"""An experiment file's checks: its schema (located errors), its data and model files, and its grid's techniques and compositions.

They live in the language layer so that ``pefref validate`` checks an experiment
file the way ``pefref run`` does, without importing the training code.
"""

from __future__ import annotations

import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any

from pefref.language.catalog import default_catalog, load_techniques
from pefref.language.check import expand_modules
from pefref.language.composition import is_composition_file, load_composition
from pefref.language.datafile import check_data
from pefref.language.errors import CatalogError, PefrefError, Problem
from pefref.language.hparams import resolve_hyperparameters
from pefref.language.limits import current
from pefref.language.loader import dotted, load_file, suggest
from pefref.language.schema import Experiment
from pefref.language.schema.experiment import GridEntry
from pefref.language.yamlsrc import Positions

__all__ = ["composition_file", "grid_size", "load_experiment"]


def load_experiment(path: str | Path) -> tuple[Experiment, Positions]:
    """Read and validate an experiment YAML file (located errors), and check that its files exist."""
    exp, pos = load_file(Experiment, path)
    root = Path(path).resolve().parent
    problems: list[Problem] = []
    for key in ("train", "eval"):
        f = root / getattr(exp.data, key)
        if not f.is_file():
            problems.append(Problem(pos.at(("data", key)), f"data.{key}", f"no such file {str(f)!r}"))
        elif f.suffix not in (".jsonl", ".json", ".csv"):
            problems.append(Problem(pos.at(("data", key)), f"data.{key}", f"unsupported file type {f.suffix!r} (jsonl, json or csv)"))
        else:  # read as training will read it: decodable, non-empty, texts and labels present, labels of one type
            label = exp.data.label if exp.task.type == "sequence_classification" else None
            try:
                check_data(f, exp.data.text, label, getattr(exp.data, f"limit_{key}"), training=key == "train")
            except PefrefError as e:
                problems.append(Problem(pos.at(("data", key)), f"data.{key}", str(e)))
    problems += _checkpoint_problems(exp, root, pos)
    problems += _model_problems(exp, pos)
    problems += _grid_size_problems(exp, pos)
    for i, entry in enumerate(exp.grid):
        uses: list[tuple[tuple[str | int, ...], str, dict[str, Any]]] = \
            [(("grid", i), entry.technique, dict(entry.hyperparameters))] if entry.technique else []
        uses += [(("grid", i, "compose", j), u.technique, dict(u.hyperparameters)) for j, u in enumerate(entry.compose or [])]
        for loc, t, hps in uses:
            problems += _technique_problems(loc, t, hps, root, pos, exp.calibration is not None)
        problems += _check_composition(entry, ("grid", i), root, pos)
    if problems:
        raise CatalogError(problems)
    return exp, pos


def _checkpoint_problems(exp: Experiment, root: Path, pos: Positions) -> list[Problem]:
    """A checkpoint folder's config.json must be a JSON object naming its model_type (what transformers reads first)."""
    if not exp.model.path:
        return []
    cfg = root / exp.model.path / "config.json"
    at = pos.at(("model", "path"))
    if not cfg.is_file():
        return [Problem(at, "model.path", f"no Hugging Face checkpoint (config.json) in {str(root / exp.model.path)!r}")]
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [Problem(at, "model.path", f"{cfg}: not a readable JSON model config ({e})")]
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        return [Problem(at, "model.path", f"{cfg}: a model config needs a 'model_type' (a JSON object as transformers writes it)")]
    return []


def grid_size(exp: Experiment) -> int:
    """How many runs the grid expands to (entries × hyperparameter axes × learning rates × seeds)."""
    total = 0
    for entry in exp.grid:
        axes = math.prod(len(v) if isinstance(v, list) else 1 for v in entry.hyperparameters.values()) if entry.technique else 1
        total += axes * len(entry.learning_rates or exp.learning_rates) * len(exp.seeds)
    return total


def _grid_size_problems(exp: Experiment, pos: Positions) -> list[Problem]:
    n, most = grid_size(exp), current().max_runs
    if n <= most:
        return []
    return [Problem(pos.at(("grid",)), "grid", f"the grid expands to {n:,} runs, over the limit of {most:,} "
                    "(narrow its axes, or raise it with pefref.language.limits.limits(max_runs=...))")]


def _model_problems(exp: Experiment, pos: Positions) -> list[Problem]:
    """A named shape must be in the catalog, a package installed, a family mapped."""
    cat = default_catalog()
    problems: list[Problem] = []
    m = exp.model
    if m.shape and m.shape not in cat.shapes:
        problems.append(Problem(pos.at(("model", "shape")), "model.shape",
                                f"no model shape {m.shape!r}{suggest(m.shape, cat.shapes)} (known: {', '.join(sorted(cat.shapes))})"))
    if m.package:
        try:
            metadata.distribution(m.package)
        except metadata.PackageNotFoundError:
            problems.append(Problem(pos.at(("model", "package")), "model.package", f"the Python distribution {m.package!r} is not installed"))
    if m.family and m.family not in cat.families:
        problems.append(Problem(pos.at(("model", "family")), "model.family",
                                f"no architecture map {m.family!r}{suggest(m.family, cat.families)} (known: {', '.join(sorted(cat.families))})"))
    return problems


def _technique_problems(loc: tuple[str | int, ...], ref: str, hps: dict[str, Any], root: Path, pos: Positions,
                        calibrated: bool = True) -> list[Problem]:
    """A grid's technique must exist (a catalog id, or a file that passes the technique checks) and take its hyperparameters;
    one initialised from data (its modules declare calibration statistics) needs the experiment's ``calibration:`` section.

    Every value of a hyperparameter axis is checked (name, type, bounds) as
    ``apply`` would check it, so a typo fails before any training starts.
    """
    cat = default_catalog()
    key = (*loc, "technique")
    if ref.endswith((".yaml", ".yml")):
        f = root / ref
        if not f.is_file():
            return [Problem(pos.at(key), dotted(key), f"no such technique file {str(f)!r}")]
        if is_composition_file(f):
            return []  # checked as a composition
        loaded, _src, _pos, problems = load_techniques([f], cat.reference, cat.techniques)
        if problems:
            return problems
        tech = next(iter(loaded.values()))
    elif ref not in cat.techniques:
        return [Problem(pos.at(key), dotted(key), f"no technique {ref!r} in the catalog{suggest(ref, cat.techniques)}")]
    else:
        tech = cat.techniques[ref]
    out: list[Problem] = []
    if not calibrated and any(getattr(m, "calibration", None) for m in expand_modules(tech, {**cat.techniques, tech.id: tech})[0]):
        out.append(Problem(pos.at(key), dotted(key), f"{tech.id} initialises from calibration statistics: give the experiment a "
                           "calibration: section (e.g. calibration: {batches: 8})"))
    for name, values in hps.items():
        for v in values if isinstance(values, list) else [values]:
            try:
                resolve_hyperparameters(tech.hyperparameters, {name: v})
            except PefrefError as e:
                hk = (*loc, "hyperparameters", name)
                out.append(Problem(pos.at(hk), dotted(hk), f"{tech.id}: {e}"))
                break
    return out


def _catalog_compositions() -> dict[str, Path]:
    """The compositions of every catalog by id (a composition's id is its file's stem)."""
    return dict(default_catalog().compositions)


def composition_file(entry: GridEntry, root: Path) -> Path | None:
    """The composition file a grid entry trains (``composition:``, or a composition file given as ``technique:``), if any.

    Raises:
        PefrefError: ``composition:`` names neither a file nor a catalog composition.
    """
    ref = entry.composition
    if ref is None:
        if entry.technique and entry.technique.endswith((".yaml", ".yml")) and (root / entry.technique).is_file() \
                and is_composition_file(root / entry.technique):
            return (root / entry.technique).resolve()
        return None
    if ref.endswith((".yaml", ".yml")):
        if not (root / ref).is_file():
            raise PefrefError(f"no such composition file {str(root / ref)!r}")
        return (root / ref).resolve()
    known = _catalog_compositions()
    if ref not in known:
        raise PefrefError(f"no composition {ref!r} in the catalog{suggest(ref, known)} (known: {', '.join(sorted(known))})")
    return known[ref].resolve()


def _check_composition(entry: GridEntry, loc: tuple[str | int, ...], root: Path, pos: Positions) -> list[Problem]:
    """Problems of a composition entry: it must resolve and pass the composition checks (located in its own file)."""
    key = (*loc, "composition" if entry.composition else "technique")
    try:
        path = composition_file(entry, root)
    except PefrefError as e:
        return [Problem(pos.at(key), dotted(key), str(e))]
    if path is None:
        return []
    if entry.hyperparameters:
        return [Problem(pos.at((*loc, "hyperparameters")), dotted((*loc, "hyperparameters")),
                        "a composition takes its hyperparameters from its file (its techniques' `hyperparameters`)")]
    try:
        load_composition(path, default_catalog())
    except CatalogError as e:
        return list(e.problems)
    return []
