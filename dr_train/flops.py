"""Analytic FLOP count of `MochiTransformer3DModel`: one forward, and one LoRA training micro-step.

Counted: every matrix product (a Linear or the patch-embed convolution: 2 * in * out FLOPs per row; attention:
QK^T and AV, 4 * B * heads * T^2 * head_dim with T = visual + text tokens; the RoPE frequency einsum, which is
negligible). Not counted: biases and elementwise work (norms, activations, RoPE rotation, residuals, softmax),
which is memory-bound and not what MFU measures. All numbers are FLOPs (a multiply-add is 2).

The model, for a latent (B, C, F, H, W), patch p, text length L, width d = heads * head_dim, text width d_t
(`pooled_projection_dim`), feed-forward inner widths f = (8 d) // 3 and f_t = (8 d_t) // 3 (SwiGLU: the first
projection is 2 f wide), visual tokens T_v = F * (H / p) * (W / p):

    embeddings  patch_embed conv (C p^2 -> d) on B T_v rows; time embedder (time_embed_dim -> d -> d) on B rows;
                text pooler to_kv (D -> 2D) on B (L+1) rows, to_q (D -> D) and to_out (D -> d) on B rows, its
                one-query attention 4 B (L+1) D; caption_proj (D -> d_t) on B L rows    (D = text_embed_dim)
    each block  adaLN modulation: norm1.linear (d -> 4d) and norm1_context.linear (d -> 4 d_t; last block
                norm1_context.linear_1, d -> d_t) on B rows; to_q/k/v (d -> d) and to_out.0 (d -> d) on B T_v
                rows; add_q/k/v_proj (d_t -> d) and to_add_out (d -> d_t) on B L rows; ff (d -> 2f, f -> d) on
                B T_v rows, ff_context (d_t -> 2 f_t, f_t -> d_t) on B L rows; joint attention over T_v + L.
                The last block has no to_add_out and no ff_context (its text stream ends there).
    head        norm_out.linear (d -> 2d) on B rows, proj_out (d -> p^2 C_out) on B T_v rows

Training (`training_flops`): the base weights are frozen, so a base Linear's backward is one product (the input
gradient, 1x its forward) and only where its input needs a gradient, i.e. downstream of a LoRA adapter: nothing
before block 0's attention (embeddings, block 0's Q/K/V projections) and no adaLN modulation linear (they read the
timestep embedding, which needs no gradient) has a backward. A LoRA adapter (A: in -> r, B: r -> out) costs
2 rows r (in + out) forward; backward adds the input gradients of B and A (where needed) and the weight gradients
of the adapters updated this step (HMT marks the others requires_grad=False; they still run forward).
Attention backward (`attention_backward`): "math" (default) counts the four products of the textbook backward,
each half a forward (dV = P^T dO where V needs a gradient, dP = dO V^T where Q or K does, dQ = dS K, dK = dS^T Q),
which is 2x the forward when Q, K and V all need gradients (always after block 0; in block 0 only the projections
whose adapters are updated this step need them): the convention for model FLOPs and MFU, and exactly what autograd runs through the math SDPA
backend. "fused": FlashAttention / memory-efficient / cuDNN kernels compute QK^T again and all three gradients
whenever any is needed, 2.5x (what `torch.utils.flop_counter` charges them). With gradient checkpointing every
transformer block runs its forward once more in the backward pass (`recompute`; the PaLM convention leaves it out
of MFU and counts it in "hardware FLOPs").

Checked against `torch.utils.flop_counter.FlopCounterMode` on the tiny preset in tests/test_profile_step.py (exact
with the math SDPA backend; on CPU the fused SDPA kernel is not counted by FlopCounterMode at all).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from dr_train.method.triplet import resolve_placement


@dataclass(frozen=True)
class MochiDims:
    """The transformer's sizes (defaults: Mochi-1, genmo/mochi-1-preview's transformer config)."""
    patch_size: int = 2
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 48
    pooled_projection_dim: int = 1536
    in_channels: int = 12
    out_channels: int | None = None
    text_embed_dim: int = 4096
    time_embed_dim: int = 256

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ff_inner(self) -> int:
        return (4 * self.dim * 2) // 3

    @property
    def ff_context_inner(self) -> int:
        return (4 * self.pooled_projection_dim * 2) // 3

    @classmethod
    def of(cls, model_or_config: Any) -> "MochiDims":
        """From a MochiTransformer3DModel, its `.config`, a plain dict, or a MochiDims."""
        if isinstance(model_or_config, MochiDims):
            return model_or_config
        cfg = getattr(model_or_config, "config", model_or_config)
        names = [f.name for f in dataclasses.fields(cls)]
        get = (lambda k: cfg[k]) if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k))
        values = {}
        for name in names:
            try:
                values[name] = get(name)
            except (KeyError, AttributeError):
                pass
        return cls(**values)


MOCHI_1 = MochiDims()


@dataclass
class FlopCount:
    """FLOPs of one transformer forward (and, from `training_flops`, of its backward) for one micro-batch.

    Forward parts: `linears` (every frozen base Linear and the patch-embed convolution), `attention` (joint
    attention QK^T + AV in the blocks, plus the text pooler's one-query attention), `rope` (the RoPE frequency
    einsum; negligible), `lora` (LoRA A and B of every active adapter). Backward parts: `linears_backward`,
    `attention_backward`, `lora_backward` (0 for a forward-only count). `recompute`: the extra forward of the
    transformer blocks under gradient checkpointing (0 without). `blocks_forward`: the forward FLOPs inside the
    transformer blocks (what checkpointing recomputes). `by_layer`: forward FLOPs per named layer kind, summed
    over blocks (`blocks.attn1.to_q`, `blocks.attention`, `embed.patch_embed`, `lora.relation`, ...)."""
    batch: int
    visual_tokens: int          # per sample, after patching: F * (H/p) * (W/p)
    text_tokens: int            # per sample, as run through the text linears
    attention_tokens: int       # per sample, keys/queries of the joint attention: visual + attended text
    linears: int = 0
    attention: int = 0
    rope: int = 0
    lora: int = 0
    linears_backward: int = 0
    attention_backward: int = 0
    lora_backward: int = 0
    recompute: int = 0
    blocks_forward: int = 0
    by_layer: dict = field(default_factory=dict)

    @property
    def forward(self) -> int:
        return self.linears + self.attention + self.rope + self.lora

    @property
    def backward(self) -> int:
        return self.linears_backward + self.attention_backward + self.lora_backward

    @property
    def model(self) -> int:
        """Forward + backward, without checkpointing's recompute: the numerator of MFU."""
        return self.forward + self.backward

    @property
    def hardware(self) -> int:
        """Everything the device executes, recompute included: the numerator of HFU."""
        return self.model + self.recompute

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(forward=self.forward, backward=self.backward, model=self.model, hardware=self.hardware)
        return out


def _rank_and_placement(lora) -> tuple[int, dict[str, list[str]]]:
    """(rank, {adapter: [projection, ...]}) from a LoRAConfig-like object (rank, placement) or a dict."""
    if lora is None:
        return 0, {}

    if isinstance(lora, Mapping):
        return int(lora["rank"]), resolve_placement(lora["placement"])
    return int(lora.rank), resolve_placement(lora.placement)


def block_linears(dims: MochiDims, last: bool) -> list[tuple[str, str, int, int]]:
    """(module name within the block, stream 'visual'|'text'|'temb', in, out) of every Linear of one block."""
    d, dt = dims.dim, dims.pooled_projection_dim
    f, ft = dims.ff_inner, dims.ff_context_inner
    out = [("norm1.linear", "temb", d, 4 * d),
           ("norm1_context.linear_1", "temb", d, dt) if last else ("norm1_context.linear", "temb", d, 4 * dt)]
    out += [(f"attn1.{n}", "visual", d, d) for n in ("to_q", "to_k", "to_v")]
    out += [(f"attn1.{n}", "text", dt, d) for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
    out += [("attn1.to_out.0", "visual", d, d)]
    if not last:
        out += [("attn1.to_add_out", "text", d, dt)]
    out += [("ff.net.0.proj", "visual", d, 2 * f), ("ff.net.2", "visual", f, d)]
    if not last:
        out += [("ff_context.net.0.proj", "text", dt, 2 * ft), ("ff_context.net.2", "text", ft, dt)]
    return out


def _lora_key(module: str) -> str:
    """Block module name -> the projection name LoRA placements use ('attn1.to_q' -> 'to_q')."""
    return module[len("attn1."):] if module.startswith("attn1.") else module


def count_flops(model_or_config: Any, latent_shape: Iterable[int], text_tokens: int, lora=None,
                training: bool = False, trainable: Iterable[str] | None = None,
                gradient_checkpointing: bool = False, attention_backward: str = "math",
                attention_text_tokens: int | None = None) -> FlopCount:
    """FLOPs of one forward (training=False) or one training micro-step of a MochiTransformer3DModel.

    latent_shape: (B, C, F, H, W) of the latent the transformer is called on. text_tokens: T5 sequence length L
    (the text linears always run on all L). attention_text_tokens: text tokens the joint attention attends over
    (default L: the `sdpa` backend attends over the padded length; diffusers' `reference` processor drops padding,
    so pass the valid count there). lora: a LoRAConfig (or {'rank', 'placement'}) for the relation LoRA triplet, or
    None. trainable: adapters whose weights get gradients (default: every adapter of the placement; under HMT the
    step's selection). attention_backward: 'math' or 'fused' (see the module docstring for the backward model)."""
    if attention_backward not in ("math", "fused"):
        raise ValueError(f"attention_backward must be 'math' or 'fused', got {attention_backward!r}")
    dims = MochiDims.of(model_or_config)
    B, C, F, H, W = (int(v) for v in latent_shape)
    p = dims.patch_size
    if H % p or W % p:
        raise ValueError(f"latent height and width must be multiples of the patch size {p}, got {H}x{W}")
    L = int(text_tokens)
    La = L if attention_text_tokens is None else int(attention_text_tokens)
    Tv = F * (H // p) * (W // p)
    rank, placement = _rank_and_placement(lora)
    trainable = set(placement if trainable is None else trainable)
    unknown = trainable - set(placement)
    if placement and unknown:
        raise ValueError(f"trainable adapters {sorted(unknown)} are not in the LoRA placement {list(placement)}")
    walk = _Walk(dims, FlopCount(batch=B, visual_tokens=Tv, text_tokens=L, attention_tokens=Tv + La),
                 {"visual": B * Tv, "text": B * L, "temb": B}, training, placement, rank, trainable,
                 attention_backward, B, Tv, L, La)
    _count_embeddings(walk)
    grad = {"visual": False, "text": False, "temb": False}       # which residual streams need a gradient
    walk.out.blocks_forward = sum(_count_block(walk, i == dims.num_layers - 1, grad) for i in range(dims.num_layers))
    if training and gradient_checkpointing:
        walk.out.recompute = walk.out.blocks_forward
    _count_head(walk, grad)
    return walk.out


@dataclass
class _Walk:
    """What a count walks through: the model's dims, the step's token counts and LoRA, and the count it fills."""
    dims: MochiDims
    out: FlopCount
    rows: dict
    training: bool
    placement: dict
    rank: int
    trainable: set
    attention_backward: str
    B: int
    Tv: int
    L: int
    La: int

    def add(self, key: str, value: int) -> None:
        self.out.by_layer[key] = self.out.by_layer.get(key, 0) + int(value)


def _count_embeddings(w: _Walk) -> None:
    """Patch, timestep and caption embeddings and RoPE: frozen, no gradient reaches them."""
    dims, B, Tv, L, D, d, p = w.dims, w.B, w.Tv, w.L, w.dims.text_embed_dim, w.dims.dim, w.dims.patch_size
    embed = [("embed.patch_embed", B * Tv, dims.in_channels * p * p, d),
             ("embed.timestep_embedder.linear_1", B, dims.time_embed_dim, d),
             ("embed.timestep_embedder.linear_2", B, d, d),
             ("embed.pooler.to_kv", B * (L + 1), D, 2 * D),
             ("embed.pooler.to_q", B, D, D),
             ("embed.pooler.to_out", B, D, d),
             ("embed.caption_proj", B * L, D, dims.pooled_projection_dim)]
    for name, r, i, o in embed:
        w.out.linears += 2 * r * i * o
        w.add(name, 2 * r * i * o)
    pool_attn = 4 * B * (L + 1) * D             # one query per sample over 1 + L keys (8 heads of D / 8)
    w.out.attention += pool_attn
    w.add("embed.pooler.attention", pool_attn)
    w.out.rope = 2 * Tv * 3 * (dims.num_attention_heads * dims.attention_head_dim // 2)   # pos (N,3) x freqs (3,h,f)
    w.add("rope.einsum", w.out.rope)


def _count_block(w: _Walk, last: bool, grad: dict) -> int:
    """One transformer block, following which activations need a gradient; updates `grad` (the residual streams
    pick up the gradient requirement of what is added to them); returns the block's forward FLOPs."""
    out, dims = w.out, w.dims
    block_fwd = 0
    needs_out = {}                   # module -> whether its output needs a gradient
    for name, stream, fin, fout in block_linears(dims, last):
        r = w.rows[stream]
        if name == "attn1.to_out.0" or name == "attn1.to_add_out":
            g_in = needs_out["attention"]
        elif name == "ff.net.2":
            g_in = needs_out["ff.net.0.proj"]
        elif name == "ff_context.net.2":
            g_in = needs_out["ff_context.net.0.proj"]
        else:
            g_in = grad[stream]
        base = 2 * r * fin * fout
        out.linears += base
        block_fwd += base
        w.add(f"blocks.{name}", base)
        if w.training and g_in:
            out.linears_backward += base
        g_out = g_in
        for adapter, projections in w.placement.items():
            if _lora_key(name) not in projections:
                continue
            a_fwd, b_fwd = 2 * r * fin * w.rank, 2 * r * w.rank * fout
            out.lora += a_fwd + b_fwd
            block_fwd += a_fwd + b_fwd
            w.add(f"lora.{adapter}", a_fwd + b_fwd)
            t = adapter in w.trainable
            if w.training:
                out.lora_backward += (a_fwd if g_in else 0) + (a_fwd if t else 0)   # A: dx, dW_A
                out.lora_backward += (b_fwd if (g_in or t) else 0) + (b_fwd if t else 0)   # B: d(Ax), dW_B
            g_out = g_out or t
        needs_out[name] = g_out
        if name == "attn1.add_v_proj":          # Q/K/V of both streams are in: the joint attention
            block_fwd += _count_attention(w, needs_out)
        if name == "attn1.to_out.0" or name == "ff.net.2":
            grad["visual"] = grad["visual"] or g_out
        if name == "attn1.to_add_out" or name == "ff_context.net.2":
            grad["text"] = grad["text"] or g_out
    return block_fwd


def _count_attention(w: _Walk, needs_out: dict) -> int:
    """The joint attention of one block (forward, and backward for the inputs that need a gradient)."""
    dims = w.dims
    attn = 4 * w.B * dims.num_attention_heads * (w.Tv + w.La) ** 2 * dims.attention_head_dim
    w.out.attention += attn
    w.add("blocks.attention", attn)
    need = {x: needs_out[f"attn1.to_{x}"] or needs_out[f"attn1.add_{x}_proj"] for x in "qkv"}
    g_attn = any(need.values())
    if w.training and g_attn:
        if w.attention_backward == "fused":      # QK^T again, then dV, dP, dQ, dK regardless
            products = 5
        else:                                  # dV = P^T dO; dP = dO V^T; dQ = dS K; dK = dS^T Q
            products = need["v"] + (need["q"] or need["k"]) + need["q"] + need["k"]
        w.out.attention_backward += products * attn // 2
    needs_out["attention"] = g_attn
    return attn


def _count_head(w: _Walk, grad: dict) -> None:
    d, p, c_out = w.dims.dim, w.dims.patch_size, w.dims.out_channels or w.dims.in_channels
    head = [("head.norm_out.linear", w.B, d, 2 * d, False),
            ("head.proj_out", w.B * w.Tv, d, p * p * c_out, grad["visual"])]
    for name, r, i, o, g_in in head:
        w.out.linears += 2 * r * i * o
        w.add(name, 2 * r * i * o)
        if w.training and g_in:
            w.out.linears_backward += 2 * r * i * o


def forward_flops(model_or_config: Any, latent_shape: Iterable[int], text_tokens: int, lora=None,
                  attention_text_tokens: int | None = None) -> FlopCount:
    """FLOPs of one forward (backward and recompute fields 0). See `count_flops`."""
    return count_flops(model_or_config, latent_shape, text_tokens, lora,
                       attention_text_tokens=attention_text_tokens)


def training_flops(model_or_config: Any, latent_shape: Iterable[int], text_tokens: int, lora=None,
                   trainable: Iterable[str] | None = None, gradient_checkpointing: bool = False,
                   attention_backward: str = "math", attention_text_tokens: int | None = None) -> FlopCount:
    """FLOPs of one training micro-step (forward, backward, and checkpointing's recompute). See `count_flops`."""
    return count_flops(model_or_config, latent_shape, text_tokens, lora, training=True, trainable=trainable,
                       gradient_checkpointing=gradient_checkpointing,
                       attention_backward=attention_backward,
                       attention_text_tokens=attention_text_tokens)


# Dense bf16 tensor-core peak (TFLOP/s, vendor figures without sparsity) by device-name substring; first match
# wins, so the specific names come first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("MI300X", 1307.0),
]


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak from PEAK_BF16_TFLOPS, or None when the name is unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None
