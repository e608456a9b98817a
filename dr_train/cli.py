"""Command-line front of the trainer: a handful of common flags, everything else through --set; and
`one_line_errors`, which every entry point (launch/*.py) runs its main through."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import Callable

from dr_train.config import load_config
from dr_train.eval.vlm import VLMError
from dr_train.runtime import quiet_library_noise

USAGE_ERROR = 2        # a bad option, file or input: the user can fix it and run again
RUN_FAILURE = 1        # the run itself failed (a non-finite loss, the VLM endpoint gave up)


def _run_failures() -> tuple[type[BaseException], ...]:
    # deferred: dr_train.trainer imports dr_train.generate, which runs its own main through this module
    from dr_train.trainer import NonFiniteLossError
    return NonFiniteLossError, VLMError


def report_error(error: BaseException, code: int) -> int:
    """Print `error` as one line 'error: ...' on stderr (no traceback) and return the exit code `code`."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return code


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's `main(argv)`: a ValueError (a user error) ends it with one line on stderr and exit code 2;
    a non-finite training loss or a failed VLM endpoint with one line and exit code 1; anything else propagates."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except ValueError as e:
            return report_error(e, USAGE_ERROR)
        except RuntimeError as e:
            if not isinstance(e, _run_failures()):
                raise
            return report_error(e, RUN_FAILURE)
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train relation LoRA triplets (DreamRelation) on Mochi-1.")
    p.add_argument("--config", help="YAML config (see configs/default.yaml); defaults apply where it is silent")
    p.add_argument("--relations", help="'all', a comma list of catalog names (train.relations)")
    p.add_argument("--output-dir", help="train.output_dir")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--checkpoint-every", type=int, help="train.checkpoint_every")
    p.add_argument("--resume", action="store_true", help="continue each relation from its latest checkpoint")
    p.add_argument("--resume-from", metavar="STEP",
                   help="resume from this checkpoint (e.g. step-40) instead of the latest, when the latest is "
                        "damaged (train.resume_from; one relation)")
    p.add_argument("--deterministic", action="store_true", help="bit-reproducible kernels (train.deterministic)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                   help="override any config option, e.g. --set lora.placement=relation_v (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)   # passed by `deepspeed`
    return p


def config_from_args(args: argparse.Namespace):
    overrides = list(args.set)
    named = {"relations": "train.relations", "output_dir": "train.output_dir", "max_steps": "train.max_steps",
             "checkpoint_every": "train.checkpoint_every", "seed": "train.seed", "resume_from": "train.resume_from"}
    for attr, key in named.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if attr == 'resume_from' else value}")
    if args.resume:
        overrides.append("train.resume=true")
    if args.deterministic:
        overrides.append("train.deterministic=true")
    return load_config(args.config, overrides)


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet_library_noise()
    cfg = config_from_args(args)            # every option checked before any model loads
    from dr_train.trainer import train      # deferred: see _run_failures
    results = train(cfg)
    print(json.dumps(results, indent=1))
    return 0
