"""Evaluate a training run and write its report: generate the evaluation videos (resumable; skipped with
--no-generate), compute the metrics, write report.md + report.html.

    python launch/evaluate.py runs/x --clip /models/clip-vit-base-patch32 --out runs/x/eval
    python launch/evaluate.py runs/x --num-prompts 2 --steps 4        # quick look (fewer prompts, fewer steps)

Options are in --help; commands, layout and every metric's settings in docs/evaluation.md.
"""
import argparse
import logging
import sys
from pathlib import Path

from dr_train.cli import one_line_errors
from dr_train.eval.evaluate import add_eval_args, eval_kwargs, evaluate_run
from dr_train.eval.report import build_report
from dr_train.generate import add_batch_args, batch_kwargs, generate_batch
from dr_train.runtime import quiet_library_noise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate, evaluate and report a training run (all its relations).")
    p.add_argument("run", help="the training run folder (train.output_dir)")
    p.add_argument("--out", help="where metrics.json, videos.csv, report.md/html and figures/ go (default <run>/eval)")
    p.add_argument("--videos", help="the generated videos (default <run>/eval/videos)")
    p.add_argument("--no-generate", action="store_true", help="evaluate the videos already in --videos")
    p.add_argument("--relations", help="comma list of relations to generate (default: all finished ones)")
    p.add_argument("--no-base", action="store_true", help="skip the base model's videos")
    p.add_argument("--prompts-shown", type=int, default=3, help="prompts per relation shown in the report")
    add_batch_args(p)
    add_eval_args(p)
    return p


@one_line_errors
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    quiet_library_noise()
    run = Path(a.run)
    videos = Path(a.videos) if a.videos else run / "eval" / "videos"
    if not a.no_generate:
        relations = [r.strip() for r in a.relations.split(",") if r.strip()] if a.relations else None
        index = generate_batch(run, relations, include_base=not a.no_base, out_dir=videos, **batch_kwargs(a))
        print(f"videos: {index['videos']} ({index['generated']} generated, {index['skipped']} already there)")
    metrics = evaluate_run(run, videos, out_dir=a.out, **eval_kwargs(a))
    paths = build_report(run, Path(a.out or run / "eval") / "metrics.json", prompts_shown=a.prompts_shown)
    print(f"evaluated {sum(metrics['videos'].values())} videos; report: {paths['markdown']} and {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
