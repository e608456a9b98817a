"""Pretraining throughput of the synth base (samples/s of each stage), on whatever device runs it.

Times `--steps` optimizer steps (after `--warmup` untimed ones) of the VAE stage (clips rendered on the fly, bf16
autocast as the recipe says, and again in fp32 for the ratio) and of the transformer stage (on a corpus of random
latents and caption embeddings of the recipe's shapes, so no VAE is needed), and the corpus stage's encoding rate.
Appends rows to perf/results/bench_pretrain.csv with the device and git hash.

    python perf/bench_pretrain.py                    # the recipe's sizes
    python perf/bench_pretrain.py --steps 5 --set transformer.batch_size=64
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import append_csv, device_name, git_hash  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dr_train.data import world  # noqa: E402
from dr_train.model.synth import TEXT_TOKENS, synth_vae  # noqa: E402
from dr_train.pretrain.config import load_pretrain_config  # noqa: E402
from dr_train.pretrain.transformer import TransformerStage  # noqa: E402
from dr_train.pretrain.vae import VAEStage  # noqa: E402


def timed(step, steps: int, warmup: int) -> float:
    for i in range(warmup):
        step(i)
    started = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    return (time.perf_counter() - started) / steps


def fake_corpus(out: Path, cfg, clips: int) -> None:
    """A corpus folder with random latents and captions of the recipe's shapes (what the transformer stage reads)."""
    folder = out / "corpus"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"mean": torch.randn(clips, 12, 5, 8, 8, generator=g).half(),
               "logvar": torch.full((clips, 12, 5, 8, 8), -6.0).half(),
               "caption": torch.randint(0, 8, (clips,), generator=g, dtype=torch.int32)},
              str(folder / "block-00000.safetensors"))
    save_file({"embeds": torch.randn(9, TEXT_TOKENS, cfg.text.d_model, generator=g),
               "masks": torch.arange(TEXT_TOKENS)[None].repeat(9, 1) < 10}, str(folder / "text.safetensors"))
    (folder / "DONE.json").write_text(json.dumps({"clips": clips}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.OPTION=VALUE")
    ap.add_argument("--out", default=str(REPO / "perf" / "results" / "bench_pretrain.csv"))
    args = ap.parse_args()
    cfg = load_pretrain_config(None, args.overrides)
    rows = []
    common = {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "git": git_hash()}
    for bf16 in (True, False):
        cfg.vae.bf16 = bf16
        stage = VAEStage(cfg)
        seconds = timed(stage.train_step, args.steps, args.warmup)
        rows.append({"stage": "vae", "precision": "bf16 autocast" if bf16 else "fp32", "batch": cfg.vae.batch_size,
                     "clip": f"{cfg.vae.clip_frames}x64x64", "seconds_per_step": round(seconds, 4),
                     "samples_per_second": round(cfg.vae.batch_size / seconds, 3), **common})
    with tempfile.TemporaryDirectory() as tmp:
        fake_corpus(Path(tmp), cfg, 512)
        stage, t = TransformerStage(cfg, Path(tmp)), cfg.transformer
        seconds = timed(stage.train_step, args.steps, args.warmup)
        rows.append({"stage": "transformer", "precision": "fp32", "batch": cfg.transformer.batch_size,
                     "clip": f"latent 12x5x8x8, {t.layers} blocks x {t.heads} heads x {t.head_dim}",
                     "seconds_per_step": round(seconds, 4),
                     "samples_per_second": round(cfg.transformer.batch_size / seconds, 3), **common})
        vae = synth_vae(1).eval()
        started = time.perf_counter()
        clips = np.stack([world.corpus_clip(i).frames for i in range(16)])
        with torch.no_grad():
            x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
            vae.encode(x)
        seconds = time.perf_counter() - started
        rows.append({"stage": "corpus (render + encode)", "precision": "fp32", "batch": 16, "clip": "25x64x64",
                     "seconds_per_step": round(seconds, 4), "samples_per_second": round(16 / seconds, 3), **common})
    for r in rows:
        print(f"{r['stage']:26s} {r['precision']:14s} batch {r['batch']:3d}  {r['seconds_per_step']:8.3f} s/step  "
              f"{r['samples_per_second']:8.2f} samples/s")
    vae_rows = [r for r in rows if r["stage"] == "vae"]
    print(f"vae bf16 autocast vs fp32: {vae_rows[0]['samples_per_second'] / vae_rows[1]['samples_per_second']:.2f}x")
    append_csv(Path(args.out), rows)


if __name__ == "__main__":
    main()
