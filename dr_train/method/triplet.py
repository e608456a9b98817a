"""The relation LoRA triplet: PEFT adapters `relation`, `subject1`, `subject2`, `ffn` on every Mochi block.

Placement is data: a mapping adapter -> projections (both streams named explicitly), or the name of a preset
below (the paper's design, its Table 3 placements and Table 2 ablations, and direct LoRA as the baseline).
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from dr_train.config import LoRAConfig

ADAPTERS = ("relation", "subject1", "subject2", "ffn")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
FEEDFORWARD_PROJECTIONS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
PROJECTIONS = ATTENTION_PROJECTIONS + FEEDFORWARD_PROJECTIONS

_QK = ["to_q", "to_k", "add_q_proj", "add_k_proj"]
_V = ["to_v", "add_v_proj"]
_Q = ["to_q", "add_q_proj"]
_KV = ["to_k", "to_v", "add_k_proj", "add_v_proj"]
_OUT = ["to_out.0", "to_add_out"]

PLACEMENTS: dict[str, dict[str, list[str]]] = {
    # the paper: relation on Q,K; subjects on V; ffn on the attention output linears; both streams
    "paper": {"relation": _QK, "subject1": _V, "subject2": _V, "ffn": _OUT},
    # Table 3: relation on V / Q / K,V, subjects take the rest of Q,K,V
    "relation_v": {"relation": _V, "subject1": _QK, "subject2": _QK, "ffn": _OUT},
    "relation_q": {"relation": _Q, "subject1": _KV, "subject2": _KV, "ffn": _OUT},
    "relation_kv": {"relation": _KV, "subject1": _Q, "subject2": _Q, "ffn": _OUT},
    # Table 2: one adapter type removed
    "no_relation": {"subject1": _V, "subject2": _V, "ffn": _OUT},
    "no_subject": {"relation": _QK, "ffn": _OUT},
    "no_ffn": {"relation": _QK, "subject1": _V, "subject2": _V},
    # direct LoRA fine-tuning baseline: Q,K,V (as `relation`) and the output linears (as `ffn`), exported whole
    "direct": {"relation": _QK + _V, "ffn": _OUT},
}

_PARAM = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def resolve_placement(placement) -> dict[str, list[str]]:
    """A preset name or a mapping -> validated {adapter: [projection, ...]} in canonical adapter order."""
    if isinstance(placement, str):
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown LoRA placement {placement!r}; presets: {', '.join(PLACEMENTS)}")
        placement = PLACEMENTS[placement]
    if not isinstance(placement, dict) or not placement:
        raise ValueError(f"LoRA placement must be a preset name or a non-empty mapping, got {placement!r}")
    out = {}
    for adapter, projections in placement.items():
        if adapter not in ADAPTERS:
            raise ValueError(f"LoRA placement names adapter {adapter!r}; adapters are {', '.join(ADAPTERS)}")
        if isinstance(projections, str):
            projections = [projections]
        bad = [p for p in projections if p not in PROJECTIONS]
        if bad or not projections:
            raise ValueError(f"adapter {adapter!r}: unknown projection(s) {bad or projections}; "
                             f"known: {', '.join(PROJECTIONS)}")
        out[adapter] = list(dict.fromkeys(projections))
    return {a: out[a] for a in ADAPTERS if a in out}


def target_regex(projections: list[str]) -> str:
    """Anchored regex over module names: only the transformer blocks (never e.g. time_embed.pooler.to_q)."""
    alts = [("attn1\\." if p in ATTENTION_PROJECTIONS else "") + re.escape(p) for p in projections]
    return r"^transformer_blocks\.\d+\.(?:" + "|".join(alts) + r")$"


def add_relation_lora_triplet(transformer, config=None):
    """Add the relation LoRA triplet (per `config`, a LoRAConfig; defaults: the paper's placement, rank 16,
    alpha 16) to a MochiTransformer3DModel, all adapters active, LoRA weights in fp32. Returns the transformer."""
    config = config or LoRAConfig()
    placement = resolve_placement(config.placement)
    for adapter, projections in placement.items():
        with warnings.catch_warnings():   # several named adapters on one model is the point of the triplet
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.add_adapter(
                LoraConfig(r=int(config.rank), lora_alpha=float(config.alpha), lora_dropout=0.0,
                           init_lora_weights=True, target_modules=target_regex(projections)),
                adapter_name=adapter,
            )
    set_active_adapters(transformer, list(placement))
    for name, p in transformer.named_parameters():
        if _PARAM.match(name):
            p.data = p.data.float()
            p.requires_grad_(True)
    return transformer


def set_active_adapters(transformer, adapters: list[str]) -> None:
    """Run exactly `adapters` in the forward pass; the others contribute nothing (and get no gradient). PEFT also
    marks only the active adapters trainable; hybrid mask training re-applies its own choice after this."""
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(list(adapters))


def adapter_names(transformer) -> list[str]:
    found = {m.group("adapter") for n, _ in transformer.named_parameters() if (m := _PARAM.match(n))}
    return [a for a in ADAPTERS if a in found]


def adapter_parameters(transformer) -> dict[str, list[torch.nn.Parameter]]:
    out: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in transformer.named_parameters():
        if m := _PARAM.match(name):
            out.setdefault(m.group("adapter"), []).append(p)
    return out


def lora_named_parameters(transformer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in transformer.named_parameters() if _PARAM.match(n)}


def adapter_state_dict(transformer) -> dict[str, torch.Tensor]:
    """Every adapter's weights keyed '<adapter>/<module>.lora_A.weight' (our checkpoint format)."""
    out = {}
    for name, p in lora_named_parameters(transformer).items():
        m = _PARAM.match(name)
        out[f"{m.group('adapter')}/{m.group('module')}.lora_{m.group('ab')}.weight"] = p.detach().cpu().contiguous()
    return out


def load_adapter_state_dict(transformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Inverse of adapter_state_dict; any missing, extra or mis-shaped key is an error naming `source`."""
    params = lora_named_parameters(transformer)
    expected = {}
    for name in params:
        m = _PARAM.match(name)
        expected[f"{m.group('adapter')}/{m.group('module')}.lora_{m.group('ab')}.weight"] = name
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{source}: adapter weights do not match the model's LoRA placement "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    with torch.no_grad():
        for key, name in expected.items():
            p = params[name]
            if state[key].shape != p.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, the model expects "
                                 f"{tuple(p.shape)}")
            p.copy_(state[key].to(p.dtype))


def inference_lora_state_dict(transformer, adapters: list[str]) -> dict[str, torch.Tensor]:
    """The chosen adapters as ONE LoRA in diffusers' format (scale 1): each adapter's alpha/r is folded into
    lora_B, and adapters sharing a module are concatenated along the rank, which is exact."""
    present = adapter_names(transformer)
    missing = [a for a in adapters if a not in present]
    if missing:
        raise ValueError(f"cannot export adapter(s) {missing}: the model has {present}")
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    modules = dict(transformer.named_modules())
    for name, p in lora_named_parameters(transformer).items():
        m = _PARAM.match(name)
        if m.group("ab") != "A" or m.group("adapter") not in adapters:
            continue
        module_name, adapter = m.group("module"), m.group("adapter")
        layer = modules[module_name]
        a = layer.lora_A[adapter].weight.detach().float().cpu()
        b = layer.lora_B[adapter].weight.detach().float().cpu() * float(layer.scaling[adapter])
        per_module.setdefault(module_name, []).append((a, b))
    out = {}
    for module_name, pairs in sorted(per_module.items()):
        out[f"{module_name}.lora_A.weight"] = torch.cat([a for a, _ in pairs], dim=0).contiguous()
        out[f"{module_name}.lora_B.weight"] = torch.cat([b for _, b in pairs], dim=1).contiguous()
    return out


def export_inference_lora(transformer, out_dir: str | Path, adapters=("relation", "ffn"),
                          metadata: dict | None = None) -> Path:
    """Write the adapters used at inference in diffusers' LoRA format: `MochiPipeline.load_lora_weights(out_dir)`."""
    from diffusers import MochiPipeline  # deferred: diffusers is a heavy import, needed only here

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = inference_lora_state_dict(transformer, list(adapters))
    MochiPipeline.save_lora_weights(out_dir, transformer_lora_layers=state, safe_serialization=True)
    (out_dir / "dr_relation.json").write_text(json.dumps({"adapters": list(adapters), **(metadata or {})}, indent=2))
    return out_dir / "pytorch_lora_weights.safetensors"
