"""Analysis tools of the paper: Q/K/V subspace similarity (Sec. 3.3, `subspace`) and relation-word attention maps
(Sec. 4.2, `attention_maps`). Definitions: docs/metrics_relation.md."""
from dr_train.analysis.attention_maps import (DIRECTIONS, capture_relation_attention, phrase_token_indices,
                                              relation_attention_maps, save_attention_strip)
from dr_train.analysis.subspace import (plot_similarity_heatmap, qkv_similarity_table, subspace_similarity,
                                        top_singular_vectors)

__all__ = ["DIRECTIONS", "capture_relation_attention", "phrase_token_indices", "relation_attention_maps",
           "save_attention_strip", "plot_similarity_heatmap", "qkv_similarity_table", "subspace_similarity",
           "top_singular_vectors"]
