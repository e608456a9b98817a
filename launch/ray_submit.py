"""Train many relations concurrently on a Ray cluster (docs/ray.md).

On this machine (a local Ray cluster):   python launch/ray_submit.py --relations all --max-concurrent 2
On a cluster:   ray job submit --address http://HEAD:8265 --working-dir . -- \
                    python launch/ray_submit.py --relations all --storage /shared/runs/ntu --gpus-per-relation 1

The training config is the same as launch/train.py's (--config YAML, the common flags, --set section.option=value);
the Ray flags are RayOptions' (dr_train/orchestrate/options.py). Exit status: 0 when every relation finished,
1 when any failed (the results table says why), 2 for a usage error.
"""
import argparse
import sys

from dr_train.cli import config_from_args, one_line_errors
from dr_train.orchestrate import run_relations
from dr_train.orchestrate.options import RayOptions, option_fields


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train relation LoRA triplets concurrently on a Ray cluster.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t = p.add_argument_group("training (as launch/train.py)")
    t.add_argument("--config", help="YAML config (see configs/default.yaml)")
    t.add_argument("--relations", help="'all' or a comma list of catalog names (train.relations)")
    t.add_argument("--max-steps", type=int, help="train.max_steps")
    t.add_argument("--checkpoint-every", type=int, help="train.checkpoint_every")
    t.add_argument("--seed", type=int, help="train.seed")
    t.add_argument("--deterministic", action="store_true", help="train.deterministic")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                   help="override any config option (repeatable)")
    r = p.add_argument_group("Ray")
    for f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        if f.name == "history":
            r.add_argument(flag, action="append", default=[], metavar="RESULTS_CSV", help=f.metadata["help"])
        else:
            r.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.output_dir, args.resume = None, False          # the storage is the output folder; resuming is implied
    cfg = config_from_args(args)
    opts = RayOptions(**{f.name: getattr(args, f.name) for f in option_fields()})
    report = run_relations(cfg, opts)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
