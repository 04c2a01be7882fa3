"""What a first ``apply`` imports: nothing the call does not use (checked in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

UNUSED = ["jinja2", "networkx", "rich", "sympy", "typer", "pefref.language.schema.composition",
          "pefref.language.schema.experiment", "pefref.language.schema.interop", "pefref.render", "pefref.experiments"]


def test_apply_imports_only_what_it_uses(tmp_path: Path) -> None:
    code = f"""
import json, sys, torch, transformers
sys.path.insert(0, {str(ROOT)!r})
cfg = transformers.AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)
model = transformers.AutoModelForCausalLM.from_config(cfg)
before = set(sys.modules)
from pefref.runtime.api import apply
apply(model, "lora", r=2)
print(json.dumps(sorted(m for m in set(sys.modules) - before)))
"""
    env = {**os.environ, "PEFREF_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "pefref.language.schema.technique" in loaded  # the check can fail
    bad = [m for m in UNUSED if m in loaded]
    assert not bad, bad
