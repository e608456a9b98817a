"""The main job on its built-in default (`make demo`, launch/demo.py): relation LoRA triplets trained on the synth
base from `person` exemplars, videos generated for unseen prompts (other kinds) with the base model and with each
exported LoRA, both judged by the world's metrics, the table printed, and `<output-dir>/report.html` and
`report.md` written (exemplar keyframes, base vs LoRA keyframes, the table). Every training flag applies; the
generation flags below pick how many videos."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from dr_train.cli import build_parser as train_parser, config_from_args
from dr_train.eval.evaluate import evaluate_run
from dr_train.eval.report import KIND_LABEL, WORLD_COLUMNS, build_report, format_interval, world_verdict
from dr_train.generate import generate_batch
from dr_train.runtime import quiet_library_noise
from dr_train.trainer import train

log = logging.getLogger("dr_train")


def build_parser() -> argparse.ArgumentParser:
    p = train_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--num-prompts", type=int, default=4, help="evaluation prompts per relation (default 4)")
    p.add_argument("--gen-seeds", default="0,1", help="sampling seeds of every prompt (default 0,1)")
    p.add_argument("--gen-steps", type=int, default=32, help="Euler sampler steps (default 32)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (default 5.0)")
    p.add_argument("--batch-size", type=int, default=8, help="videos sampled together (default 8)")
    return p


def table(metrics: dict) -> str:
    """The world metrics per relation and overall, base beside LoRA, as plain text."""
    rows = [r for r in metrics["rows"] if r.get("world")]
    head = ["relation", "model", "videos"] + [label for _, label in WORLD_COLUMNS]
    body = [[r["relation"], KIND_LABEL[r["kind"]], str(r["videos"])]
            + [format_interval(r["world"].get(k)) for k, _ in WORLD_COLUMNS] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def run_demo(cfg, num_prompts: int, seeds: list[int], steps: int, guidance_scale: float, batch_size: int) -> dict:
    phases, clock = {}, time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name], clock = now - clock, now

    results = train(cfg)
    phase("train")
    run_dir = Path(cfg.train.output_dir)
    relations = [r["relation"] for r in results]
    generate_batch(run_dir, relations, prompts="eval", num_prompts=num_prompts, seeds=seeds, steps=steps,
                   guidance_scale=guidance_scale, batch_size=batch_size)
    phase("generate")
    metrics = evaluate_run(run_dir, fvd=False)
    phase("evaluate")
    paths = build_report(run_dir, out_dir=run_dir,
                         title="dr-train demo: relation LoRAs trained on the synth base, against the base model")
    phase("report")
    return {"results": results, "metrics": metrics, "report": paths, "phases": phases}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet_library_noise()
    try:
        cfg = config_from_args(args)
        seeds = [int(s) for s in args.gen_seeds.split(",") if s.strip()]
        out = run_demo(cfg, args.num_prompts, seeds, args.gen_steps, args.guidance_scale, args.batch_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(out["metrics"]))
    verdict = world_verdict(out["metrics"]["rows"])
    if verdict is not None:
        print(verdict)
    print(f"report: {out['report']['html']} and {out['report']['markdown']}")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["phases"].items()))
    print(json.dumps({r["relation"]: r.get("lora") for r in out["results"]}, indent=1))
    return 0
