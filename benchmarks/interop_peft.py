"""peft's adapter format both ways: max abs output differences and trainable counts, per row of the interop table.

Driven by ``catalog/interop/peft.yaml``: for every row (a peft type and the
variant of a catalog technique it reads or writes) and each of tiny Llama and
GPT-2 (fp32, CPU), the cases of ``tests/interop_cases.py`` that exercise the row
are run:

* ``pefref→peft`` (export rows): a perturbed pefref adapter saved with
  ``save_pretrained`` and loaded by ``peft.PeftModel.from_pretrained`` (diff:
  pefref vs peft), then read back by ``pefref.from_pretrained`` (back: the
  re-read adapter vs the original);
* ``peft→pefref`` (rows that read): a perturbed adapter built and saved by peft,
  read by ``pefref.from_pretrained`` (diff), and saved again for peft (back).

A row the converter refuses on a model (e.g. a method peft has only for
nn.Linear, on GPT-2's Conv1D) records the converter's own error message; a row
no case exercises says so; a row naming a form of peft's that the converter
does not take (``refused``, e.g. Arrow's several adapters) records its reason. Counts: trainable parameters of the pefref adapter
and of peft's loaded adapter (prompt learning: the saved tensors, which peft
loads frozen). Prints a markdown table; ``--json FILE`` writes one object per
row and model: peft_type, technique, variant, model, max_diff,
trainable_pefref, trainable_peft and round_trip (both legs' max diffs, or the
reason there is none). Runs in a few minutes on one core; ``--technique``
measures only that technique's rows.

    python benchmarks/interop_peft.py [--json out.json] [--technique ID ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError
from pefref.language.interop_table import interop_table
from pefref.language.schema import PeftMethod
from tests.interop_cases import CASES, SHAPES, Case, apply_case, base, export_case, import_case

CATALOG = default_catalog()


def variant(row: PeftMethod) -> str:
    """How the row tells itself apart from the technique's other rows (its when and fixed config)."""
    parts = [f"{k}={v}" for k, v in row.when.items()] + [f"{k}={v}" for k, v in row.config.items() if not isinstance(v, list)]
    return ", ".join(parts) + (" (import only)" if row.import_only else " (export only)" if row.export_only else "")


def _hps(case: Case) -> dict[str, Any]:
    defaults = {k: h.default for k, h in CATALOG.technique(case.technique).hyperparameters.items()}
    return {**defaults, **case.hps}


def export_cases(row: PeftMethod) -> list[str]:
    """The cases whose pefref adapter this row writes."""
    if row.import_only:
        return []
    table_rows = [m for m in interop_table().methods if m.technique == row.technique and not m.import_only]
    return [n for n, c in CASES.items() if c.technique == row.technique
            and next((m for m in table_rows if all(_hps(c).get(k) == v for k, v in m.when.items())), None) is row]


def import_cases(row: PeftMethod) -> list[str]:
    """The cases whose peft adapter this row reads."""
    if row.export_only:
        return []
    out = []
    for n, c in CASES.items():
        if c.peft is None or (c.reads_as or c.technique) != row.technique:
            continue
        cfg = c.peft("llama")
        if str(getattr(cfg.peft_type, "value", cfg.peft_type)) == row.peft_type and \
                all(getattr(cfg, k, v) == v or (isinstance(v, list) and getattr(cfg, k, None) in v) for k, v in row.config.items()):
            out.append(n)
    return out


def refusal(shape: str, case: Case) -> str | None:
    """The converter's error when it refuses this case's pefref adapter on this model, else None."""
    model = copy.deepcopy(base(shape))
    try:
        adapter = apply_case(model, shape, case)  # a family without a site it needs refuses here
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save_pretrained(Path(tmp) / "a")
    except PefrefError as e:
        return str(e)
    return None


def measure(row: PeftMethod, shape: str, tmp: Path) -> dict[str, Any]:
    """One row on one model: the export leg's diff and counts, and both round trips (or why there are none)."""
    rec: dict[str, Any] = {"peft_type": row.peft_type, "technique": row.technique, "variant": variant(row), "model": shape,
                           "max_diff": None, "trainable_pefref": None, "trainable_peft": None, "round_trip": None}
    if row.refused:
        rec["round_trip"] = f"refused: {row.refused}"
        return rec
    outs, ins = export_cases(row), import_cases(row)
    if not outs and not ins:
        rec["round_trip"] = "no case exercises this row"
        return rec
    legs: dict[str, Any] = {}
    for name in outs[:1]:
        why = refusal(shape, CASES[name])
        if why is not None:
            rec["round_trip"] = f"refused: {why}"
            return rec
        r = export_case(shape, name, tmp / f"{shape}-{name}-out")
        rec.update(max_diff=r.diff, trainable_pefref=r.counts["pefref"], trainable_peft=r.counts["peft"])
        legs["pefref->peft"] = r.diff
        legs["pefref->peft->pefref"] = r.back
    for name in ins[:1]:
        if shape == "tiny-gpt2" and CASES[name].linear_only:
            legs["peft->pefref"] = "peft adapts only nn.Linear with this method (GPT-2's projections are Conv1D)"
            continue
        r = import_case(shape, name, tmp / f"{shape}-{name}-in")
        if rec["max_diff"] is None:
            rec.update(max_diff=r.diff, trainable_pefref=r.counts["pefref"], trainable_peft=r.counts["peft"])
        legs["peft->pefref"] = r.diff
        legs["peft->pefref->peft"] = r.back
    rec["round_trip"] = legs
    return rec


def _cell(v: Any) -> str:
    return "—" if v is None else f"{v:.1e}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write one object per row and model here")
    parser.add_argument("--technique", action="append", default=None, help="measure only the rows of this technique (repeatable)")
    args = parser.parse_args()
    only = set(args.technique or [])
    warnings.simplefilter("ignore")
    rows = []
    print("| peft_type | technique | variant | model | max diff | pefref→peft→pefref | peft→pefref | peft→pefref→peft | trainable pefref | trainable peft |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for row in interop_table().methods:
            if only and row.technique not in only:
                continue
            for shape in SHAPES:
                rec = measure(row, shape, Path(tmp))
                rows.append(rec)
                rt = rec["round_trip"]
                legs = [rt.get(k) for k in ("pefref->peft->pefref", "peft->pefref", "peft->pefref->peft")] if isinstance(rt, dict) else [rt, None, None]
                print(f"| {row.peft_type} | {row.technique} | {rec['variant']} | {shape} | {_cell(rec['max_diff'])} | "
                      + " | ".join(_cell(v) for v in legs) + f" | {_cell(rec['trainable_pefref'])} | {_cell(rec['trainable_peft'])} |",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
