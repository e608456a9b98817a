"""Loader throughput (samples/s) against the rate a training step consumes samples, in the same run.

The loader must outpace the trainer, or the GPU waits on data. This builds a dataset of fabricated samples at
a chosen size (the tiny preset's latent, or Mochi's real (12, 11, 60, 106) latent with a 256x4096 T5
embedding), streams it through `ShardStream` with several worker counts, times training steps of the tiny preset
(or the step time you measured on your GPU, `--step-seconds`), and reports loader samples/s, step samples/s and
their ratio (> 1: the loader keeps up). Appends rows to perf/results/bench_loader.csv with device, versions and
git hash.

    python perf/bench_loader.py                                 # tiny, workers 0,2
    python perf/bench_loader.py --size mochi --samples 24 --workers 0,2,4 --step-seconds 3.35
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import append_csv, git_hash  # noqa: E402

from dr_train.catalog import load_catalog  # noqa: E402
from dr_train.config import load_config  # noqa: E402
from dr_train.data import shards as shard_io  # noqa: E402
from dr_train.data.loader import ShardStream  # noqa: E402
from dr_train.data.sources import resolve_dataset  # noqa: E402
from dr_train.distributed import Dist  # noqa: E402
from dr_train.geometry import video_frames  # noqa: E402
from dr_train.model import load_mochi  # noqa: E402
from dr_train.trainer import RelationRun  # noqa: E402

SIZES = {"tiny": ((12, 3, 8, 8), (16, 32)), "mochi": ((12, 11, 60, 106), (256, 4096))}


def fabricate(root: Path, latent_shape, text_shape, samples: int, per_shard: int) -> Path:
    rng = np.random.default_rng(0)
    c, f, h, w = latent_shape
    manifest = shard_io.new_manifest({"model": "fabricated", "latent_channels": c, "text_tokens": text_shape[0],
                                      "text_dim": text_shape[1]}, {"frames": video_frames(f)})
    root.mkdir(parents=True, exist_ok=True)
    manifest["null_text_sha256"] = shard_io.save_null_text(root, np.zeros(text_shape, np.float32),
                                                           np.zeros(text_shape[:1], bool))
    items = []
    for i in range(samples):
        items.append(shard_io.Sample(
            key=f"bench__{i:05d}", latent_mean=rng.standard_normal(latent_shape, dtype=np.float32),
            latent_logvar=np.full(latent_shape, -6.0, np.float32),
            mask_subject1=rng.random((f, h, w), dtype=np.float32), mask_subject2=rng.random((f, h, w), dtype=np.float32),
            mask_subject1_maxpool=rng.random((f, h, w), dtype=np.float32),
            mask_subject2_maxpool=rng.random((f, h, w), dtype=np.float32),
            text_embed=rng.standard_normal(text_shape, dtype=np.float32), text_mask=np.ones(text_shape[:1], bool),
            preview=np.zeros((5, 72, 128, 3), np.uint8), preview_masks=np.zeros((5, 2, 72, 128), np.uint8),
            meta={"relation": "bench", "source": f"fabricated/{i}"}))
    names = []
    for s in range(0, samples, per_shard):
        name = f"shards/bench-{s // per_shard:06d}.tar"
        manifest["shards"].append({"name": name, "relation": "bench"} |
                                  shard_io.write_shard(root / name, items[s:s + per_shard]))
        names.append(name)
    manifest["relations"]["bench"] = {"samples": samples, "shards": names}
    shard_io.save_manifest(root, manifest)
    return root


def loader_rate(root: Path, workers: int, batches: int, batch_size: int) -> tuple[float, float]:
    """(samples/s in steady state, seconds to the first batch)."""
    stream = ShardStream(root, ["bench"], batch_size, seed=0, num_workers=workers)
    t0 = time.perf_counter()
    stream.next_batch()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        stream.next_batch()
    rate = batches * batch_size / (time.perf_counter() - t0)
    stream.close()
    return rate, first


def tiny_step_seconds(steps: int) -> float:
    """Median step time of the real trainer on the tiny preset (CPU or GPU, whichever this machine has)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, ["model.preset=tiny", f"data.cache_dir={tmp}/cache", f"train.output_dir={tmp}/runs"])
        relation = load_catalog()["handshaking"]
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        run = RelationRun(cfg, load_mochi("tiny"), relation, Path(tmp) / "r", Dist(device=device),
                          resolve_dataset(cfg, [relation]))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            run.train_step()
            times.append(time.perf_counter() - t0)
        run.close()
    return statistics.median(times[2:] if len(times) > 4 else times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--per-shard", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--batches", type=int, default=40, help="batches timed per worker setting")
    p.add_argument("--workers", default="0,2", help="comma list of DataLoader worker counts")
    p.add_argument("--step-seconds", type=float, default=0.0,
                   help="seconds per training step to compare with (default: measure the tiny preset here)")
    p.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    a = p.parse_args(argv)
    latent_shape, text_shape = SIZES[a.size]
    step = a.step_seconds or tiny_step_seconds(12)
    consume = a.batch_size / step
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = fabricate(Path(tmp) / "ds", latent_shape, text_shape, a.samples, a.per_shard)
        sample_mb = sum(f.stat().st_size for f in (root / "shards").iterdir()) / a.samples / 2**20
        for workers in [int(w) for w in a.workers.split(",")]:
            rate, first = loader_rate(root, workers, a.batches, a.batch_size)
            rows.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device, "git": git_hash(),
                         "torch": torch.__version__, "size": a.size, "sample_MB": round(sample_mb, 3),
                         "batch_size": a.batch_size, "workers": workers, "loader_samples_per_s": round(rate, 2),
                         "first_batch_s": round(first, 3), "step_seconds": round(step, 4),
                         "step_samples_per_s": round(consume, 2), "loader_over_step": round(rate / consume, 2),
                         "step_source": "given" if a.step_seconds else "tiny preset measured here"})
            print(f"workers={workers}: loader {rate:.1f} samples/s ({sample_mb:.2f} MB each), training consumes "
                  f"{consume:.1f} samples/s -> ratio {rate / consume:.1f}")
    path = append_csv(a.out / "bench_loader.csv", rows)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
