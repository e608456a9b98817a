"""Command-line front of the trainer: a handful of common flags, everything else through --set."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dr_train.config import load_config
from dr_train.runtime import quiet_library_noise
from dr_train.trainer import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train relation LoRA triplets (DreamRelation) on Mochi-1.")
    p.add_argument("--config", help="YAML config (see configs/default.yaml); defaults apply where it is silent")
    p.add_argument("--relations", help="'all', a comma list of catalog names (train.relations)")
    p.add_argument("--output-dir", help="train.output_dir")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--checkpoint-every", type=int, help="train.checkpoint_every")
    p.add_argument("--resume", action="store_true", help="continue each relation from its latest checkpoint")
    p.add_argument("--deterministic", action="store_true", help="bit-reproducible kernels (train.deterministic)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                   help="override any config option, e.g. --set lora.placement=relation_v (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)   # passed by `deepspeed`
    return p


def config_from_args(args: argparse.Namespace):
    overrides = list(args.set)
    named = {"relations": "train.relations", "output_dir": "train.output_dir", "max_steps": "train.max_steps",
             "checkpoint_every": "train.checkpoint_every", "seed": "train.seed"}
    for attr, key in named.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.resume:
        overrides.append("train.resume=true")
    if args.deterministic:
        overrides.append("train.deterministic=true")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet_library_noise()
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        results = train(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=1))
    return 0
