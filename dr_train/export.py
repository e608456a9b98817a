"""Export a relation's inference LoRA: the diffusers file, the ComfyUI file, their metadata and a model card.

    python launch/export.py runs/x/handshaking                      # the latest checkpoint -> runs/x/handshaking/lora
    python launch/export.py runs/x/handshaking --step 200           # -> runs/x/handshaking/lora-step-200
    python launch/export.py runs/x/handshaking --format comfyui --adapters relation,ffn --out /tmp/lora

`<out>/` holds pytorch_lora_weights.safetensors (diffusers: `MochiPipeline.load_lora_weights(<out>)`),
`<relation>_comfyui.safetensors` (ComfyUI: copy into ComfyUI/models/loras/), dr_relation.json and README.md (a
Hugging Face model card). Every .safetensors file carries the same string metadata (`lora_metadata`); the layouts
and the ComfyUI code they follow are in docs/export.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from dr_train import __version__
from dr_train.base_identity import PRESETS
from dr_train.catalog import catalog_for
from dr_train.checkpoint import list_checkpoints, load_checkpoint
from dr_train.cli import one_line_errors
from dr_train.config import load_config
from dr_train.lora_formats import comfyui_rank_splits, comfyui_state_dict
from dr_train.method.triplet import (adapter_names, add_relation_lora_triplet, export_inference_lora,
                                     inference_lora_state_dict, load_adapter_state_dict)
from dr_train.model import load_mochi
from dr_train.run_folder import LORA_FILE, RelationFolder

FORMATS = ("diffusers", "comfyui")
DIFFUSERS_FILE = LORA_FILE
HUB_BASE_MODEL = "genmo/mochi-1-preview"
TAGS = ["lora", "text-to-video", "mochi", "dreamrelation"]
_REPO = Path(__file__).resolve().parent.parent


def comfyui_file_name(relation: str | None) -> str:
    return f"{relation}_comfyui.safetensors" if relation else "comfyui_lora.safetensors"


def config_sha256(transformer) -> str:
    """sha256 of the transformer's config as sorted-key JSON, without diffusers' bookkeeping entries ('_name_or_path',
    '_diffusers_version', ...): the same architecture gives the same hash wherever it was loaded from."""
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def git_commit() -> str:
    """HEAD of the repository this package runs from ('+dirty' with uncommitted tracked changes), else 'unknown'."""
    if not (_REPO / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def lora_metadata(transformer, adapters: list[str], metadata: dict) -> dict[str, str]:
    """The string metadata every exported file carries: the caller's (relation, prompt, placement, rank, alpha,
    base_model, steps; non-strings as JSON) plus the adapters, the base model's config hash and the method version."""
    out = {k: _text(v) for k, v in metadata.items()}
    out |= {"adapters": ",".join(adapters), "base_model_config_sha256": config_sha256(transformer),
            "method": "dreamrelation", "method_version": __version__, "method_commit": git_commit()}
    return out


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """(Re)write `path` with `tensors` and `metadata` (all strings) next to safetensors' 'format': 'pt'."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata of {path} must be strings; not: {', '.join(bad)}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={**metadata, "format": "pt"})
    return path


def check_formats(formats) -> list[str]:
    """`formats` (a list, or one comma-separated string) as a list; an unknown or empty one is a ValueError."""
    formats = [f.strip() for f in formats.split(",") if f.strip()] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown LoRA export format(s) {', '.join(map(repr, unknown))}; formats: "
                         f"{', '.join(FORMATS)}")
    if not formats:
        raise ValueError(f"no LoRA export format given; formats: {', '.join(FORMATS)}")
    return formats


def export_lora(transformer, out_dir: str | Path, adapters, formats=FORMATS, metadata: dict | None = None,
                card: dict | None = None) -> dict[str, Path]:
    """Write `adapters` of `transformer` as one inference LoRA in each of `formats` (diffusers, comfyui) under
    `out_dir`, with `lora_metadata` in every file, dr_relation.json, and README.md when `card` is given (see
    `training_card`). Returns {format: path, 'card': path}."""
    formats = check_formats(formats)
    out_dir, adapters, metadata = Path(out_dir), list(adapters), dict(metadata or {})
    meta = lora_metadata(transformer, adapters, metadata)
    paths: dict[str, Path] = {}
    if "diffusers" in formats:
        path = export_inference_lora(transformer, out_dir, adapters)
        state = load_file(str(path))
        paths["diffusers"] = write_safetensors(path, state, meta | {"lora_format": "diffusers"})
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {f"transformer.{k}": v for k, v in inference_lora_state_dict(transformer, adapters).items()}
    if "comfyui" in formats:
        layers = int(transformer.config.num_layers)
        splits = comfyui_rank_splits(state, layers)
        paths["comfyui"] = write_safetensors(out_dir / comfyui_file_name(metadata.get("relation")),
                                             comfyui_state_dict(state, layers),
                                             meta | {"lora_format": "comfyui", "rank_splits": _text(splits)})
    files = {f: p.name for f, p in paths.items()}
    record = {**meta, **metadata, "adapters": adapters, "files": files}      # the caller's values keep their types
    (out_dir / "dr_relation.json").write_text(json.dumps(record, indent=2, default=str))
    if card is not None:
        paths["card"] = out_dir / "README.md"
        paths["card"].write_text(model_card(meta, files, out_dir, card))
    return paths


def training_card(config: dict, images: list[Path] = ()) -> dict:
    """The model card's training section from a run's full config dict (Config.to_dict(), or state.json's
    'config'), and the validation keyframes to list."""
    lora, optim, loss, hmt, train = (config[s] for s in ("lora", "optim", "loss", "hmt", "train"))
    settings = {
        "placement": lora["placement"], "learning rate": optim["lr"], "LR schedule": optim["schedule"],
        "warmup steps": optim["warmup_steps"], "batch size x grad accum": f"{train['batch_size']} x "
                                                                          f"{train['grad_accum']}",
        "loss mode": loss["mode"], "mask weight": loss["mask_weight"], "RCL weight": loss["rcl_weight"],
        "RCL variant": loss["rcl_variant"], "HMT": "on" if hmt["enabled"] else "off",
        "HMT forward": hmt["forward"], "frozen adapters": optim["frozen_adapters"], "seed": train["seed"],
    }
    return {"training": settings, "images": [Path(p) for p in images]}


def validation_keyframes(relation_dir: Path, step: int | None = None) -> list[Path]:
    """keyframes.png of the validation at `step` (else the latest validation at or before it), sorted; [] when the
    relation has no validation/ folder."""
    folder = RelationFolder(Path(relation_dir)).validation
    if not folder.is_dir():
        return []
    steps = sorted((int(p.name[5:]), p) for p in folder.glob("step-*") if p.name[5:].isdigit())
    steps = [(s, p) for s, p in steps if step is None or s <= step]
    return sorted(steps[-1][1].glob("*/keyframes.png")) if steps else []


def _loading_code(base: str, folder: Path, prompt: str) -> str:
    if base in PRESETS:
        load = (f"from dr_train.model import load_mochi\n\n"
                f"pipe = load_mochi({base!r}).pipeline()           # the dr-train preset this LoRA was trained on")
    else:
        load = (f"import torch\nfrom diffusers import MochiPipeline\n\n"
                f"pipe = MochiPipeline.from_pretrained({base!r}, torch_dtype=torch.bfloat16)\n"
                f"pipe.enable_model_cpu_offload()")
    return (f"{load}\npipe.load_lora_weights({str(folder)!r}, weight_name={DIFFUSERS_FILE!r})\n"
            f"frames = pipe({prompt!r}).frames[0]")


def model_card(meta: dict[str, str], files: dict[str, str], out_dir: Path, card: dict) -> str:
    """README.md in the form the Hugging Face Hub shows for a LoRA: YAML front matter, loading code for diffusers
    and ComfyUI, training settings, and a 'Validation keyframes' section when `card['images']` is non-empty."""
    relation, prompt = meta.get("relation", "relation"), meta.get("prompt", "")
    base = meta.get("base_model", HUB_BASE_MODEL)
    hub_base = card.get("base_model") or (HUB_BASE_MODEL if base in PRESETS or Path(base).exists()
                                          else base)
    front = {"base_model": hub_base, "library_name": "diffusers", "tags": TAGS, "instance_prompt": prompt,
             "pipeline_tag": "text-to-video"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# DreamRelation LoRA: {relation}", "",
             f"A relation LoRA for Mochi-1 trained with DreamRelation (adapters {meta.get('adapters', '')} merged "
             f"into one LoRA, scale 1). Trigger prompt: `{prompt}` (the relation is what was learned: the "
             f"subjects in the prompt can be changed).",
             "", f"Trained on base `{base}` (transformer config sha256 `{meta['base_model_config_sha256']}`)"
             + ("; that is a dr-train preset, not the Mochi-1 weights." if base in PRESETS else "."), ""]
    if "diffusers" in files:
        lines += ["## diffusers", "", "```python", _loading_code(base, out_dir, prompt), "```", ""]
    if "comfyui" in files:
        lines += ["## ComfyUI", "",
                  f"Copy `{files['comfyui']}` into `ComfyUI/models/loras/` and put a `LoraLoaderModelOnly` node "
                  f"(strength 1.0) between the Mochi diffusion model loader and the sampler. The file uses ComfyUI's "
                  f"own LoRA layout for genmo's Mochi model (`diffusion_model.blocks.<i>.attn.qkv_x.lora_up.weight`, "
                  f"...; see dr-train's docs/export.md).", ""]
    rows = [("relation", relation), ("prompt", prompt), ("steps", meta.get("steps", "")),
            ("rank", meta.get("rank", "")), ("alpha", meta.get("alpha", "")),
            ("exported adapters", meta.get("adapters", ""))]
    rows += [(k, _text(v)) for k, v in card.get("training", {}).items()]
    rows += [("method", f"dr-train {meta['method_version']} ({meta['method_commit']})")]
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows] + [""]
    images = [Path(p) for p in card.get("images", [])]
    if images:
        lines += ["## Validation keyframes", ""]
        for image in images:
            rel = Path(os.path.relpath(image, out_dir)).as_posix()
            lines += [f"![{image.parent.name}]({rel})", ""]
    return "\n".join(lines)


def config_from_dict(config: dict, source: str):
    """A validated Config from a saved config dict (state.json's 'config', config.json): one override per section."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: the saved config is not a mapping")
    overrides = [f"{section}={yaml.safe_dump(values, default_flow_style=True, width=1 << 30).strip()}"
                 for section, values in config.items()]
    try:
        return load_config(None, overrides)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _prompt(cfg, relation: str, relation_dir: Path) -> str:
    catalog = catalog_for(cfg)
    if relation in catalog:
        return catalog[relation].prompt
    saved = RelationFolder(relation_dir).lora / "dr_relation.json"
    if saved.is_file():
        return json.loads(saved.read_text()).get("prompt", "")
    raise ValueError(f"relation {relation!r} is in neither the run's catalog nor {saved}: its prompt is unknown")


def export_checkpoint(relation_dir: str | Path, step: int | None = None, formats=FORMATS,
                      adapters: list[str] | None = None, out: str | Path | None = None) -> dict[str, Path]:
    """Rebuild the model a relation was trained on from a checkpoint (default: the latest) and `export_lora` it.
    Defaults: adapters = the run's lora.export_adapters present in its placement, out = <relation_dir>/lora (or
    lora-step-N for --step)."""
    relation_dir, formats = Path(relation_dir), check_formats(formats)
    if not relation_dir.is_dir():
        raise ValueError(f"relation folder {relation_dir} does not exist (give <run>/<relation>)")
    found = {int(p.name[5:]): p for p in list_checkpoints(RelationFolder(relation_dir).checkpoints)}
    if not found:
        raise ValueError(f"{RelationFolder(relation_dir).checkpoints} holds no complete checkpoint")
    if step is not None and step not in found:
        raise ValueError(f"{relation_dir} has no checkpoint at step {step}; steps: {', '.join(map(str, found))}")
    path = found[step if step is not None else max(found)]
    tensors, state = load_checkpoint(path, names=("adapters",))
    cfg = config_from_dict(state.get("config"), str(path / "state.json"))
    comps = load_mochi(cfg.model.preset, cfg.model.dtype, "sdpa", parts=("transformer",))
    transformer = add_relation_lora_triplet(comps.transformer, cfg.lora)
    load_adapter_state_dict(transformer, tensors["adapters"], str(path / "adapters.safetensors"))
    present = adapter_names(transformer)
    if adapters is None:
        adapters = [a for a in cfg.lora.export_adapters if a in present]
    missing = [a for a in adapters if a not in present]
    if missing or not adapters:
        raise ValueError(f"{path}: cannot export adapter(s) {missing or adapters}; the checkpoint has "
                         f"{', '.join(present)}")
    relation = state["identity"]["relation"]
    metadata = {"relation": relation, "prompt": _prompt(cfg, relation, relation_dir), "base_model": comps.source,
                "steps": state["step"], **state["identity"]["lora"]}
    if out is None:
        out = RelationFolder(relation_dir).lora if step is None else relation_dir / f"lora-step-{step}"
    card = training_card(cfg.to_dict(), validation_keyframes(relation_dir, state["step"]))
    return export_lora(transformer, out, adapters, formats, metadata, card)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a relation's LoRA from a training checkpoint (diffusers and "
                                            "ComfyUI files, metadata, model card).")
    p.add_argument("relation_dir", help="the relation's folder: <train.output_dir>/<relation>")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    p.add_argument("--format", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)} (default: both)")
    p.add_argument("--adapters", help="comma list of adapters (default: the run's lora.export_adapters)")
    p.add_argument("--out", help="output folder (default <relation_dir>/lora, or lora-step-N with --step)")
    return p


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    paths = export_checkpoint(a.relation_dir, a.step, _names(a.format), _names(a.adapters) if a.adapters else None,
                              a.out)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
