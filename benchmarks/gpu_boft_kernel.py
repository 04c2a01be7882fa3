"""BOFT with several butterfly factors against peft's own CUDA kernel (``fbd_cuda``), on a GPU.

On CPU peft has no kernel and keeps one butterfly factor, so the test suite checks
m = 2 against a pure-torch stand-in for the kernel. This script closes that gap on a
machine with CUDA (and nvcc + ninja, which peft's kernel is compiled with): a pefref
BOFT (b = 8, m = 2) on a tiny Llama is saved in peft's format, loaded by
``PeftModel.from_pretrained`` with the real kernel, and the logits are compared (fp32),
then the other way (peft's adapter read by ``pefref.from_pretrained``).

    python benchmarks/gpu_boft_kernel.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import warnings
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    import peft
    from peft.tuners.boft import layer as boft_layer

    import pefref
    from pefref.models.build import build_model

    dev = args.device
    torch.manual_seed(0)
    base = build_model("tiny-llama", seed=0).to(dev).eval()
    ids = torch.randint(3, 100, (2, 12), device=dev)
    kernel = boft_layer.get_fbd_cuda()
    result: dict[str, object] = {"kernel": kernel is not None, "device": torch.cuda.get_device_name() if dev.startswith("cuda") else dev}
    with tempfile.TemporaryDirectory() as tmp:
        model = copy.deepcopy(base)
        a = pefref.apply(model, "boft", b=8, m=2)
        torch.manual_seed(3)
        with torch.no_grad():
            for p in a.trainable_parameters():
                p.add_(0.3 * torch.randn_like(p))
        with torch.no_grad():
            mine = model(input_ids=ids).logits.float()
            plain = base(input_ids=ids).logits.float()
        a.save_pretrained(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
        with torch.no_grad():
            theirs = pm(input_ids=ids).logits.float()
        result["export_max_abs_diff"] = (mine - theirs).abs().max().item()
        result["adapter_changes_output_by"] = (mine - plain).abs().max().item()
        pm.save_pretrained(Path(tmp) / "from_peft")
        back = pefref.from_pretrained(copy.deepcopy(base), Path(tmp) / "from_peft")
        with torch.no_grad():
            again = back.model(input_ids=ids).logits.float()
        result["import_max_abs_diff"] = (again - theirs).abs().max().item()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
