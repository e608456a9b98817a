"""Command line of launch/pretrain_base.py: run the pretraining stages in order within a time budget."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from dr_train.distributed import pick_device
from dr_train.pretrain import STAGES, corpus, export, transformer, vae
from dr_train.pretrain.config import load_pretrain_config
from dr_train.pretrain.loop import run_stage
from dr_train.runtime import quiet_library_noise

log = logging.getLogger("dr_train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain the synth base (VAE, corpus, transformer, export) in "
                                            "resumable chunks; re-run until every stage is done.")
    p.add_argument("--config", help="YAML recipe (see configs/pretrain_synth.yaml); defaults where it is silent")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                   help="override a recipe option, e.g. --set transformer.steps=30000 (repeatable)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma list of stages to run, in order (default: all of {', '.join(STAGES)})")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop (after a checkpoint) when this much time has passed; default: run to the end")
    p.add_argument("--export-to", default=None,
                   help="folder the export stage writes the diffusers base into (default: <run.out>/synth_base)")
    p.add_argument("--recheck", default=None, metavar="FOLDER",
                   help="run no stage: run the acceptance checks again on the exported base in FOLDER (its weights "
                        "unchanged, e.g. dr_train/model/synth_base after a change to the world's relations) and "
                        "rewrite its checks.json, the card's checks section and SHA256SUMS")
    return p


def run(cfg, stages: list[str], minutes: float | None, export_to: Path | None = None) -> bool:
    """Run `stages` in order; True when all of them are done, False when the time ran out first."""
    out = Path(cfg.run.out)
    device = pick_device(cfg.run.device, "run.device")
    log.info("pretraining on %s with %d render worker(s)", device, cfg.run.workers)
    deadline = None if minutes is None else time.monotonic() + 60.0 * minutes

    def left() -> float | None:
        return None if deadline is None else max(0.0, (deadline - time.monotonic()) / 60.0)

    for name in stages:
        if left() is not None and left() <= 0:
            return False
        if name in ("vae", "decoder"):
            stage = vae.VAEStage(cfg, device) if name == "vae" else vae.DecoderStage(cfg, out, device)
            try:
                if not run_stage(stage, out / name, left(), cfg.run.checkpoint_minutes, ("loss", "psnr_heldout")):
                    return False
            finally:
                stage.close()
            if not (out / name / "final" / "config.json").is_file():
                stage.save(out / name / "final")
        elif name == "corpus":
            if not corpus.build(cfg, out, left(), device):
                return False
        elif name == "transformer":
            if not run_stage(transformer.TransformerStage(cfg, out, device), out / "transformer", left(),
                             cfg.run.checkpoint_minutes, ("loss", "subject_fidelity")):
                return False
        elif name == "export":
            export.export(cfg, out, export_to or out / "synth_base", device)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet_library_noise()
    try:
        cfg = load_pretrain_config(args.config, args.set)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
        if args.minutes is not None and args.minutes <= 0:
            raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    try:
        if args.recheck:
            target = export.recheck(cfg, Path(args.recheck), pick_device(cfg.run.device, "run.device"))
            print(f"checks rewritten in {target / 'checks.json'} and {target / 'README.md'}")
            return 0
        done = run(cfg, stages, args.minutes, Path(args.export_to) if args.export_to else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'SIGINT'}) after a checkpoint: run the same command again to continue",
              file=sys.stderr)
        return 130
    print("every stage is done" if done else "stopped after a checkpoint: run the same command again to continue")
    return 0
