#!/usr/bin/env python
"""What the machine is, for gpu_check.sh: GPU, driver, versions, and which packages this project uses import.

    python perf/gpu_env.py [--out DIR]      # prints a JSON report; with --out also writes DIR/env.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_hash  # noqa: E402

# What dr_train imports, required first; the GPU image is known to lack some (perf/build_wheelhouse.sh carries them).
PACKAGES = ("diffusers", "transformers", "peft", "accelerate", "safetensors", "triton", "webdataset", "yaml",
            "tqdm", "matplotlib", "pynvml", "flash_attn", "deepspeed", "ray", "av", "datasets", "wandb")


def probe(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as e:          # any failure to import is the finding; report it, never raise
        return f"missing ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return str(getattr(module, "__version__", "present"))


def gpu_report() -> dict:
    if not torch.cuda.is_available():
        return {"cuda": False}
    p = torch.cuda.get_device_properties(0)
    report = {"cuda": True, "name": p.name, "total_memory_GiB": round(p.total_memory / 2**30, 2),
              "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
              "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
              "bf16": torch.cuda.is_bf16_supported()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        report["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        report["nvidia_smi"] = f"unavailable: {e}"
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    report = {"git_hash": git_hash(), "python": platform.python_version(), "torch": torch.__version__,
              "platform": platform.platform(), "gpu": gpu_report(),
              "packages": {name: probe(name) for name in PACKAGES}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "env.json").write_text(text + "\n")
    missing = [n for n in ("diffusers", "transformers", "peft", "safetensors", "webdataset")
               if report["packages"][n].startswith("missing")]
    if missing:
        print(f"error: required packages missing: {', '.join(missing)} (build .whl/ with perf/build_wheelhouse.sh)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
