"""Analysis tools of the paper: Q/K/V subspace similarity (Sec. 3.3, `subspace`) and relation-word attention maps
(Sec. 4.2, `attention_maps`). Definitions: docs/metrics_relation.md.

Names are imported lazily, so `import dr_train.analysis` loads neither diffusers nor matplotlib.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DIRECTIONS": "attention_maps",
    "capture_relation_attention": "attention_maps",
    "phrase_token_indices": "attention_maps",
    "relation_attention_maps": "attention_maps",
    "save_attention_strip": "attention_maps",
    "plot_similarity_heatmap": "subspace",
    "qkv_similarity_table": "subspace",
    "subspace_similarity": "subspace",
    "top_singular_vectors": "subspace",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
