"""Subspace similarity of the Q, K, V projection weights of MM-DiT blocks (paper Sec. 3.3, Fig. 5b).

    similarity(W_a, W_b) = || U_a[:, :r]^T U_b[:, :r] ||_F^2 / r

with U the left singular vectors of each weight (LoRA, Hu et al. 2021, Sec. 7; a Grassmann-style measure): 1 when
the top-r subspaces coincide, 0 when they are orthogonal, r / n on average for random r-dimensional subspaces of
R^n. It is invariant to rotations within either subspace and to scaling of either matrix.

Convention. A torch `nn.Linear` stores its weight as (out, in) and computes y = x W^T, which is LoRA's own
convention (h = W x, W in R^{d x k}, d = out). The left singular vectors of the weight *as stored* therefore span the
projection's output space: for Q and K the space queries and keys are compared in, for V the space the attention
mixes; this is what `space="output"` (the default) measures, matching the paper's "left-singular unitary matrices".
`space="input"` uses the right singular vectors instead (the left singular vectors of W^T): which directions of the
hidden state each projection reads. Mochi's projections are square (3072 x 3072) in the visual stream; the text
stream maps 1536 -> 3072, so its input space differs from the visual stream's but Q, K and V of one stream share it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPACES = ("output", "input")
PAIRS = (("q", "k"), ("q", "v"), ("k", "v"))
STREAMS = {"visual": ("to_q", "to_k", "to_v"), "text": ("add_q_proj", "add_k_proj", "add_v_proj")}


def top_singular_vectors(weight: torch.Tensor, rank: int, space: str = "output") -> torch.Tensor:
    """(n, rank) orthonormal basis of the top-`rank` singular subspace of a (out, in) weight, in fp64:
    left singular vectors (output space, n = out) or right ones (input space, n = in)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be in 1..{min(weight.shape)} for a {tuple(weight.shape)} weight, got {rank}")
    w = weight.detach().to("cpu", torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank] if space == "output" else vh[:rank].T


def subspace_similarity(weight_a: torch.Tensor, weight_b: torch.Tensor, rank: int, space: str = "output") -> float:
    """||U_a^T U_b||_F^2 / rank over the top-`rank` singular subspaces of two weights (in [0, 1])."""
    u_a = top_singular_vectors(weight_a, rank, space)
    u_b = top_singular_vectors(weight_b, rank, space)
    if u_a.shape[0] != u_b.shape[0]:
        raise ValueError(f"the {space} spaces differ in dimension: {u_a.shape[0]} vs {u_b.shape[0]}")
    value = float((u_a.T @ u_b).pow(2).sum() / rank)
    assert -1e-9 <= value <= 1 + 1e-9, value
    return min(max(value, 0.0), 1.0)


def _blocks(model: torch.nn.Module):
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError("the model has no `transformer_blocks` (expected a MochiTransformer3DModel or the same "
                         "naming: transformer_blocks.N.attn1.to_q/to_k/to_v, add_q_proj/add_k_proj/add_v_proj)")
    return blocks


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """The effective weight of a Linear, or of a PEFT LoRA wrapper around one (its base layer's weight)."""
    base = getattr(module, "base_layer", module)
    return base.weight


def qkv_similarity_table(model: torch.nn.Module, rank: int, space: str = "output",
                         streams: tuple[str, ...] = ("visual", "text")) -> list[dict]:
    """One row per block and stream: {block, stream, rank, space, qk, qv, kv, chance}; chance = rank / n, the
    expected similarity of two random rank-dimensional subspaces of the n-dimensional space."""
    unknown = [s for s in streams if s not in STREAMS]
    if unknown:
        raise ValueError(f"unknown stream(s) {unknown}; available: {', '.join(STREAMS)}")
    rows = []
    for index, block in enumerate(_blocks(model)):
        attn = block.attn1
        for stream in streams:
            names = STREAMS[stream]
            if not all(hasattr(attn, n) for n in names):
                raise ValueError(f"block {index} has no {'/'.join(names)} projections")
            bases = {key: top_singular_vectors(_weight(getattr(attn, n)), rank, space)
                     for key, n in zip("qkv", names)}
            row = {"block": index, "stream": stream, "rank": rank, "space": space,
                   "chance": rank / bases["q"].shape[0]}
            for a, b in PAIRS:
                row[a + b] = float((bases[a].T @ bases[b]).pow(2).sum() / rank)
            rows.append(row)
    return rows


def plot_similarity_heatmap(rows: list[dict], png_path: str | Path, title: str = "") -> Path:
    """Heatmap PNG of a `qkv_similarity_table`: one panel per stream, blocks down, Q-K / Q-V / K-V across."""
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only here

    if not rows:
        raise ValueError("no similarity rows to plot")
    streams = list(dict.fromkeys(r["stream"] for r in rows))
    blocks = sorted({r["block"] for r in rows})
    fig, axes = plt.subplots(1, len(streams), figsize=(2.2 + 2.4 * len(streams), 1.2 + 0.28 * len(blocks)),
                             squeeze=False)
    image = None
    for ax, stream in zip(axes[0], streams):
        by_block = {r["block"]: r for r in rows if r["stream"] == stream}
        grid = np.array([[by_block[b][a + c] if b in by_block else np.nan for a, c in PAIRS] for b in blocks])
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(PAIRS)), [f"{a.upper()}-{c.upper()}" for a, c in PAIRS])
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6 if len(blocks) > 24 else 8)
        ax.set_title(f"{stream} stream", fontsize=9)
        ax.set_ylabel("block")
    fig.colorbar(image, ax=axes[0].tolist(), label="subspace similarity")
    first = rows[0]
    fig.suptitle(title or f"top-{first['rank']} {first['space']}-space similarity", fontsize=10)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png_path
