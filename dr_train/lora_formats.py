"""LoRA file layouts for Mochi-1: diffusers' (what `MochiPipeline.save_lora_weights` writes) and ComfyUI's.

ComfyUI runs genmo's own Mochi model (`AsymmDiTJoint`), whose names and shapes differ from diffusers': one fused
`qkv_x` / `qkv_y` linear per block instead of to_q/to_k/to_v and add_{q,k,v}_proj, `proj_x` / `proj_y` for the
output linears, `mlp_x` / `mlp_y` with the two halves of the SwiGLU input linear `w1` in the opposite order. Its
LoRA loader has no diffusers key map for Mochi, so the ComfyUI file is written in ComfyUI's own layout, one LoRA per
ComfyUI weight:

    diffusion_model.blocks.<i>.<module>.lora_up.weight    (out, r)
    diffusion_model.blocks.<i>.<module>.lora_down.weight  (r, in)
    diffusion_model.blocks.<i>.<module>.alpha             r, so ComfyUI's scale alpha / r is exactly 1

A fused qkv LoRA stacks the q, k and v LoRAs along the rank: down = cat([A_q, A_k, A_v]), up = the block-diagonal
of B_q, B_k, B_v (zero rows where a projection has no LoRA); up @ down is then exactly cat([dW_q, dW_k, dW_v]).
docs/export.md cites the ComfyUI code each of these choices follows.

`read_lora_file` and `match_lora` check a LoRA given for inference (`launch/generate.py --lora`) before anything is
loaded: a file that is not safetensors, holds no LoRA weight (a training checkpoint's adapters or optimizer file), has
LoRA shapes that do not fit the model, or names modules the model does not have is refused with a ValueError naming
the file (the last one may be allowed, loading the modules that match).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dr_train.run_folder import LORA_FILE

log = logging.getLogger("dr_train")

DIFFUSERS_PREFIX = "transformer.transformer_blocks."
COMFYUI_PREFIX = "diffusion_model.blocks."

# diffusers projection inside transformer_blocks.<i> -> (ComfyUI module inside blocks.<i>, part)
# part: 0/1/2 = q/k/v third of the fused linear's output rows, "swap" = output halves exchanged, None = as is
COMFYUI_MODULES: dict[str, tuple[str, int | str | None]] = {
    "attn1.to_q": ("attn.qkv_x", 0),
    "attn1.to_k": ("attn.qkv_x", 1),
    "attn1.to_v": ("attn.qkv_x", 2),
    "attn1.add_q_proj": ("attn.qkv_y", 0),
    "attn1.add_k_proj": ("attn.qkv_y", 1),
    "attn1.add_v_proj": ("attn.qkv_y", 2),
    "attn1.to_out.0": ("attn.proj_x", None),
    "attn1.to_add_out": ("attn.proj_y", None),
    "ff.net.0.proj": ("mlp_x.w1", "swap"),
    "ff.net.2": ("mlp_x.w2", None),
    "ff_context.net.0.proj": ("mlp_y.w1", "swap"),
    "ff_context.net.2": ("mlp_y.w2", None),
}
# the last block only reads the text tokens (diffusers: context_pre_only; genmo: update_y=False)
ABSENT_IN_LAST_BLOCK = ("attn1.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")

_DIFFUSERS_KEY = re.compile(r"^transformer\.transformer_blocks\.(?P<block>\d+)\.(?P<proj>.+)\."
                            r"lora_(?P<ab>[AB])\.weight$")
_COMFYUI_KEY = re.compile(r"^diffusion_model\.blocks\.(?P<block>\d+)\.(?P<module>.+)\."
                          r"(?P<kind>lora_up\.weight|lora_down\.weight|alpha)$")
_FUSED = {"attn.qkv_x": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
          "attn.qkv_y": ("attn1.add_q_proj", "attn1.add_k_proj", "attn1.add_v_proj")}
_BY_COMFYUI = {module: proj for proj, (module, part) in COMFYUI_MODULES.items() if module not in _FUSED}


def _check_block(block: int, proj: str, num_layers: int, key: str) -> None:
    if block >= num_layers:
        raise ValueError(f"LoRA key {key!r} names block {block}, the model has {num_layers} blocks")
    if block == num_layers - 1 and proj in ABSENT_IN_LAST_BLOCK:
        raise ValueError(f"LoRA key {key!r}: the last Mochi block has no {proj}")


def _diffusers_pairs(state: dict[str, torch.Tensor], num_layers: int) -> dict[tuple[int, str], tuple]:
    """{(block, projection): (lora_A, lora_B)} of a diffusers Mochi LoRA state dict; any other key is an error."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _DIFFUSERS_KEY.match(key)
        if m is None or m.group("proj") not in COMFYUI_MODULES:
            raise ValueError(f"LoRA key {key!r} is not a Mochi transformer-block projection "
                             f"({DIFFUSERS_PREFIX}<i>.<projection>.lora_A/B.weight)")
        block, proj = int(m.group("block")), m.group("proj")
        _check_block(block, proj, num_layers, key)
        halves.setdefault((block, proj), {})[m.group("ab")] = tensor
    return _pairs(halves, lambda key: f"LoRA of {DIFFUSERS_PREFIX}{key[0]}.{key[1]}")


def _pairs(halves: dict, where) -> dict:
    """{key: (lora_A, lora_B)} from {key: {"A": .., "B": ..}}; a ValueError starting with `where(key)` for a half
    without its partner or a pair whose ranks disagree."""
    pairs = {}
    for key, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where(key)} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where(key)}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not share a "
                             f"rank")
        pairs[key] = (a, b)
    return pairs


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """Exchange the two halves of the output rows (diffusers' SwiGLU proj <-> genmo's w1; an involution)."""
    half = w.shape[0] // 2
    return torch.cat([w[half:], w[:half]], dim=0)


def comfyui_rank_splits(diffusers_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, list[int]]:
    """Per fused ComfyUI module ('blocks.<i>.attn.qkv_x'): the ranks its q, k, v LoRAs take in the stacked rank
    (0 for a projection without a LoRA). `from_comfyui` needs them to split a fused LoRA back exactly."""
    pairs = _diffusers_pairs(diffusers_state, num_layers)
    splits: dict[str, list[int]] = {}
    for (block, proj), (a, _) in sorted(pairs.items()):
        module, part = COMFYUI_MODULES[proj]
        if module in _FUSED:
            splits.setdefault(f"blocks.{block}.{module}", [0, 0, 0])[part] = int(a.shape[0])
    return splits


def comfyui_state_dict(diffusers_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers Mochi LoRA (keys 'transformer.transformer_blocks.<i>.<proj>.lora_{A,B}.weight', scale 1) in
    ComfyUI's layout for genmo's model (module docstring); the weight delta on every ComfyUI weight is exact."""
    pairs = _diffusers_pairs(diffusers_state, num_layers)
    fused: dict[tuple[int, str], dict[int, tuple]] = {}
    loras: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (block, proj), (a, b) in pairs.items():
        module, part = COMFYUI_MODULES[proj]
        if module in _FUSED:
            fused.setdefault((block, module), {})[part] = (a, b)
        elif part == "swap":
            if b.shape[0] % 2:
                raise ValueError(f"LoRA of {DIFFUSERS_PREFIX}{block}.{proj}: a SwiGLU projection needs an even "
                                 f"output size, lora_B has {b.shape[0]} rows")
            loras[(block, module)] = (a, _swap_halves(b))
        else:
            loras[(block, module)] = (a, b)
    for (block, module), parts in fused.items():
        rows = {b.shape[0] for _, b in parts.values()}
        ins = {a.shape[1] for a, _ in parts.values()}
        if len(rows) != 1 or len(ins) != 1:
            raise ValueError(f"LoRAs fused into blocks.{block}.{module} disagree in shape: output rows {sorted(rows)}, "
                             f"inputs {sorted(ins)}")
        d = rows.pop()
        ordered = [parts[p] for p in sorted(parts)]
        down = torch.cat([a for a, _ in ordered], dim=0)
        up = torch.zeros(3 * d, down.shape[0], dtype=ordered[0][1].dtype)
        col = 0
        for p in sorted(parts):
            _, b = parts[p]
            up[p * d:(p + 1) * d, col:col + b.shape[1]] = b
            col += b.shape[1]
        loras[(block, module)] = (down, up)
    out = {}
    for (block, module), (down, up) in sorted(loras.items()):
        key = f"{COMFYUI_PREFIX}{block}.{module}"
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    return out


def from_comfyui(comfyui_state: dict[str, torch.Tensor], num_layers: int,
                 rank_splits: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of `comfyui_state_dict`: a ComfyUI-layout Mochi LoRA -> diffusers keys, ComfyUI's alpha / rank scale
    folded into lora_B. A fused qkv LoRA is split per `rank_splits` (as written by `comfyui_rank_splits`: the exact
    original tensors); without them every projection with non-zero up rows gets the whole down and its rows of up
    (the same weight delta, at the fused rank)."""
    groups: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in comfyui_state.items():
        m = _COMFYUI_KEY.match(key)
        module = m.group("module") if m else None
        if m is None or (module not in _FUSED and module not in _BY_COMFYUI):
            raise ValueError(f"LoRA key {key!r} is not a Mochi block weight in ComfyUI's layout "
                             f"({COMFYUI_PREFIX}<i>.<module>.lora_up/lora_down.weight, .alpha)")
        block = int(m.group("block"))
        _check_block(block, _BY_COMFYUI.get(module, ""), num_layers, key)
        groups.setdefault((block, module), {})[m.group("kind").split(".")[0]] = tensor
    out = {}
    for (block, module), g in sorted(groups.items()):
        name = f"{COMFYUI_PREFIX}{block}.{module}"
        if "lora_up" not in g or "lora_down" not in g:
            raise ValueError(f"ComfyUI LoRA of {name} lacks lora_up or lora_down")
        down, up = g["lora_down"], g["lora_up"]
        scale = float(g["alpha"].item()) / down.shape[0] if "alpha" in g else 1.0   # ComfyUI: alpha / rank, else 1
        up = up if scale == 1.0 else up * scale
        if module in _FUSED:
            out |= _split_fused(block, module, down, up, (rank_splits or {}).get(f"blocks.{block}.{module}"))
            continue
        proj = _BY_COMFYUI[module]
        if COMFYUI_MODULES[proj][1] == "swap":
            up = _swap_halves(up)
        out[f"{DIFFUSERS_PREFIX}{block}.{proj}.lora_A.weight"] = down.contiguous()
        out[f"{DIFFUSERS_PREFIX}{block}.{proj}.lora_B.weight"] = up.contiguous()
    return out


def _split_fused(block: int, module: str, down: torch.Tensor, up: torch.Tensor,
                 split: list[int] | None) -> dict[str, torch.Tensor]:
    name = f"{COMFYUI_PREFIX}{block}.{module}"
    if up.shape[0] % 3:
        raise ValueError(f"ComfyUI LoRA of {name}: a fused qkv needs 3 equal output parts, lora_up has "
                         f"{up.shape[0]} rows")
    d = up.shape[0] // 3
    if split is not None and (len(split) != 3 or sum(split) != down.shape[0]):
        raise ValueError(f"rank split {split} of {name} does not add up to its rank {down.shape[0]}")
    out, col = {}, 0
    for part, proj in enumerate(_FUSED[module]):
        if split is not None:
            r = split[part]
            a, b = down[col:col + r], up[part * d:(part + 1) * d, col:col + r]
            col += r
            if r == 0:
                continue
        else:
            a, b = down, up[part * d:(part + 1) * d]
            if not b.any():
                continue
        out[f"{DIFFUSERS_PREFIX}{block}.{proj}.lora_A.weight"] = a.contiguous()
        out[f"{DIFFUSERS_PREFIX}{block}.{proj}.lora_B.weight"] = b.contiguous()
    return out


# ------------------------------------------------------------------------------------------ checking a LoRA file

_LORA_KEY = re.compile(r"^(?:transformer\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_LISTED = 5                # unmatched or misfit modules an error names before '... and N more'
ADAPTER_METADATA_KEY = "lora_adapter_metadata"     # diffusers' LoRA config (rank, alpha) in a safetensors header


@dataclass(frozen=True)
class LoraFile:
    """A diffusers-layout LoRA read for inference: {module: (lora_A, lora_B)} of the transformer's modules, the keys
    that are no LoRA pair of a module, and diffusers' adapter metadata from the header (None when absent)."""
    path: Path
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    other_keys: list[str]
    adapter_metadata: dict | None


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def lora_file_path(lora: str | Path) -> Path:
    """The safetensors file a LoRA argument names: the file, or a folder's pytorch_lora_weights.safetensors."""
    path = Path(lora)
    if not path.exists():
        raise ValueError(f"LoRA {path} does not exist")
    if path.is_dir():
        if not (path / LORA_FILE).is_file():
            raise ValueError(f"LoRA folder {path} holds no {LORA_FILE} (give the folder training's export wrote, "
                             f"<run>/<relation>/lora, or the file)")
        path = path / LORA_FILE
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"LoRA file {path} is not a safetensors file ({' '.join(str(e).split())}); dr_train reads "
                         f"LoRAs only as safetensors") from None


def _no_lora_weight(path: Path, keys: list[str]) -> ValueError:
    """The refusal of a file without one LoRA weight, saying what the file looks like."""
    export = "export it with launch/export.py <run>/<relation> and give the lora folder"
    if any(re.fullmatch(r"[^/]+/.+\.lora_[AB]\.weight", k) for k in keys):
        what = (f"a training checkpoint's adapter file ('<adapter>/<module>.lora_A.weight'), not an exported LoRA: "
                f"{export}")
    elif any(re.search(r"/(exp_avg|exp_avg_sq|step)$", k) for k in keys):
        what = f"a training checkpoint's optimizer state ('<parameter>/exp_avg'), not a LoRA: {export}"
    elif any(k.startswith(COMFYUI_PREFIX) for k in keys):
        what = f"a LoRA in ComfyUI's layout: give the diffusers file {LORA_FILE} beside it"
    else:
        what = f"not a LoRA (its {len(keys)} tensors are named like {_listed(sorted(keys)[:2])})"
    return ValueError(f"LoRA file {path} holds no LoRA weight: it is {what}")


def read_lora_file(lora: str | Path) -> LoraFile:
    """Read a LoRA for inference (a file, or a folder written by export). ValueError naming the file when it does not
    exist, is not safetensors, holds no LoRA weight, or has a lora_A without its lora_B (or the reverse) or ranks that
    disagree. Keys are diffusers' ('transformer.<module>.lora_A.weight'; the 'transformer.' prefix may be absent)."""
    path = lora_file_path(lora)
    tensors, header = _read_safetensors(path)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None or "/" in key:
            other.append(key)
        else:
            halves.setdefault(m.group("module"), {})[m.group("ab")] = tensor
    if not halves:
        raise _no_lora_weight(path, list(tensors))
    pairs = _pairs(halves, lambda module: f"LoRA file {path}: {module}")
    try:
        metadata = json.loads(header[ADAPTER_METADATA_KEY]) if ADAPTER_METADATA_KEY in header else None
    except json.JSONDecodeError:
        raise ValueError(f"LoRA file {path}: its {ADAPTER_METADATA_KEY} header is not JSON") from None
    return LoraFile(path, pairs, sorted(other), metadata)


def _base_linear(module) -> torch.nn.Linear | None:
    """The Linear a LoRA goes on: the module itself, or the base layer of one an earlier adapter wrapped."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base if isinstance(base, torch.nn.Linear) else None


def match_lora(lora: LoraFile, transformer, allow_partial: bool = False) -> dict[str, torch.Tensor]:
    """The LoRA's tensors that go on `transformer`'s Linear layers, as a diffusers state dict
    ('transformer.<module>.lora_A/B.weight', A before B). ValueError naming the file when no tensor fits, when a
    module's LoRA shapes do not fit its Linear, or (unless `allow_partial`, which logs them instead) when some
    modules are not in the model or some keys are no LoRA pair."""
    modules = dict(transformer.named_modules())
    matched, unmatched, misfits = {}, list(lora.other_keys), []
    for name, (a, b) in lora.pairs.items():
        linear = _base_linear(modules[name]) if name in modules else None
        if linear is None:
            unmatched.append(name)
        elif a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            misfits.append(f"{name} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} on a Linear "
                           f"{linear.in_features} -> {linear.out_features})")
        else:
            matched[f"transformer.{name}.lora_A.weight"] = a
            matched[f"transformer.{name}.lora_B.weight"] = b
    if misfits:
        raise ValueError(f"LoRA file {lora.path} does not fit this model: wrong LoRA shapes for {_listed(misfits)}")
    if not matched:
        raise ValueError(f"LoRA file {lora.path} loads no LoRA weight into this model: none of its {len(lora.pairs)} "
                         f"modules is a Linear of the model ({_listed(unmatched)})")
    if unmatched:
        what = (f"LoRA file {lora.path}: {len(unmatched)} of its entries match no Linear of this model "
                f"({_listed(unmatched)})")
        if not allow_partial:
            raise ValueError(f"{what}; it was made for another model (--allow-partial-lora loads the "
                             f"{len(matched) // 2} modules that match)")
        log.warning("%s; loading the %d modules that match (allowed)", what, len(matched) // 2)
    return matched


def applied_lora_tensors(transformer, adapter_name: str) -> int:
    """LoRA tensors (lora_A and lora_B weights) of `adapter_name` in `transformer`'s layers."""
    from peft.tuners.lora import LoraLayer     # deferred: peft is needed only where a LoRA is applied

    return sum(2 for m in transformer.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A)
