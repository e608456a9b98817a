"""The demo's wall time by phase (train, generate, evaluate, report): `make demo`'s job, in this process, on a
scratch output folder (the synthetic dataset cache is reused; delete .cache/dr_train first to count its making).
Appends a row to perf/results/bench_demo.csv with the device and git hash.

    python perf/bench_demo.py                          # the demo's defaults
    python perf/bench_demo.py --set train.max_steps=100
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import append_csv, device_name, git_hash  # noqa: E402

from dr_train.config import load_config  # noqa: E402
from dr_train.demo import build_parser, run_demo  # noqa: E402
from dr_train.runtime import quiet_library_noise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.OPTION=VALUE")
    ap.add_argument("--out", default=str(REPO / "perf" / "results" / "bench_demo.csv"))
    args = ap.parse_args()
    quiet_library_noise()
    defaults = build_parser().parse_args([])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"train.output_dir={tmp}/runs", *args.overrides])
        started = time.perf_counter()
        out = run_demo(cfg, defaults.num_prompts, [int(s) for s in defaults.gen_seeds.split(",")],
                       defaults.gen_steps, defaults.guidance_scale, defaults.batch_size)
        total = time.perf_counter() - started
    row = {"relations": ",".join(r["relation"] for r in out["results"]), "steps": cfg.train.max_steps,
           "preset": cfg.model.preset, **{f"{k}_s": round(v, 1) for k, v in out["phases"].items()},
           "total_s": round(total, 1), "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
           "git": git_hash()}
    print(", ".join(f"{k} {v}" for k, v in row.items()))
    append_csv(Path(args.out), [row])


if __name__ == "__main__":
    main()
