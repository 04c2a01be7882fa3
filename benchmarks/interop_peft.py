"""peft's adapter format both ways: max abs output differences and trainable counts, per case.

For every case of ``tests/interop_cases.py`` on tiny Llama and GPT-2 (fp32, CPU):

* ``pefref→peft``: a perturbed pefref adapter saved with ``save_pretrained`` and
  loaded by ``peft.PeftModel.from_pretrained`` (diff: pefref vs peft), then read
  back by ``pefref.from_pretrained`` (back: the re-read adapter vs the original);
* ``peft→pefref``: a perturbed adapter built and saved by peft, read by
  ``pefref.from_pretrained`` (diff), and saved again for peft (back).

Counts: trainable parameters of the pefref adapter, of peft's loaded adapter
(prompt learning: the saved prompt, which peft loads frozen), and of the
adapter read back. Prints a markdown table (``--json FILE`` also writes the
records). Runs in about a minute on one core.

    python benchmarks/interop_peft.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.interop_cases import CASES, SHAPES, export_case, import_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the records here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    print("| case | technique | model | direction | max abs diff | round trip | reads as | trainable pefref | trainable peft | trainable back |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in SHAPES:
            for name, case in CASES.items():
                if shape == "tiny-gpt2" and case.linear_only:
                    continue
                runs = [("pefref→peft", export_case)] + ([("peft→pefref", import_case)] if case.peft is not None else [])
                for direction, run in runs:
                    folder = Path(tmp) / f"{shape}-{name}-{direction[:4]}"
                    r = run(shape, name, folder)
                    c = r.counts
                    rows.append({"case": name, "technique": case.technique, "model": shape, "direction": direction, "diff": r.diff,
                                 "back": r.back, "reads_as": r.technique, **{f"n_{k}": v for k, v in c.items()}})
                    print(f"| {name} | {case.technique} | {shape} | {direction} | {r.diff:.1e} | {r.back:.1e} | {r.technique} | "
                          f"{c['pefref']:,} | {c['peft']:,} | {c.get('back', c['pefref']):,} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
