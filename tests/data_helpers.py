"""Small datasets for data-pipeline tests: fabricated samples written with the real shard writer."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dr_train.data import shards as shard_io

TEXT_TOKENS, TEXT_DIM, CHANNELS = 4, 8, 12


def fake_sample(key: str, relation: str, latent_shape=(CHANNELS, 2, 4, 6), seed: int = 0) -> shard_io.Sample:
    rng = np.random.default_rng(seed)
    c, f, h, w = latent_shape
    return shard_io.Sample(
        key=key, latent_mean=rng.standard_normal(latent_shape, dtype=np.float32),
        latent_logvar=np.full(latent_shape, -6.0, dtype=np.float32),
        mask_subject1=rng.random((f, h, w), dtype=np.float32), mask_subject2=rng.random((f, h, w), dtype=np.float32),
        mask_subject1_maxpool=rng.random((f, h, w), dtype=np.float32),
        mask_subject2_maxpool=rng.random((f, h, w), dtype=np.float32),
        text_embed=rng.standard_normal((TEXT_TOKENS, TEXT_DIM), dtype=np.float32),
        text_mask=np.array([True, True, False, False]), preview=rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8),
        preview_masks=rng.integers(0, 255, (2, 2, 8, 8), dtype=np.uint8),
        meta={"relation": relation, "source": f"/videos/{key}.mp4", "frames": 7, "version": shard_io.VERSION})


def fake_dataset(root: Path, per_relation: dict[str, int], per_shard: int = 3, shapes=None) -> Path:
    """A dataset folder with `per_relation[name]` samples per relation; `shapes(i)` gives sample i's latent shape."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = shard_io.new_manifest({"model": "fake", "latent_channels": CHANNELS, "text_tokens": TEXT_TOKENS,
                                      "text_dim": TEXT_DIM}, {"frames": 7, "height": 32, "width": 48, "fps": 30})
    manifest["null_text_sha256"] = shard_io.save_null_text(root, np.zeros((TEXT_TOKENS, TEXT_DIM), np.float32),
                                                           np.array([True, False, False, False]))
    seed = 0
    for relation, count in per_relation.items():
        samples = []
        for i in range(count):
            shape = shapes(i) if shapes else (CHANNELS, 2, 4, 6)
            samples.append(fake_sample(f"{relation}__{i:04d}", relation, shape, seed))
            seed += 1
        names = []
        for s in range(0, count, per_shard):
            name = f"shards/{relation}-{s // per_shard:06d}.tar"
            entry = {"name": name, "relation": relation} | shard_io.write_shard(root / name, samples[s:s + per_shard])
            manifest["shards"].append(entry)
            names.append(name)
        manifest["relations"][relation] = {"samples": count, "shards": names}
    shard_io.save_manifest(root, manifest)
    return root


# prepare at test size: the tiny preset, 7 frames of 32 x 48, in the test process
SIZE = ["model.preset=tiny", "prepare.frames=7", "prepare.height=32", "prepare.width=48", "prepare.workers=0"]


def prepare_config(*extra):
    from dr_train.config import load_config
    return load_config(None, SIZE + list(extra)).prepare
