"""Atomic, verifiable training checkpoints (safetensors + JSON; no pickle).

Layout of `<relation>/checkpoints/step-00000020/`:
  adapters.safetensors     every adapter's weights, keyed '<adapter>/<module>.lora_{A,B}.weight'
  optimizer.safetensors    AdamW moments and step per LoRA parameter, keyed '<param name>/<state>'
  rng.safetensors          generator states (HMT draws, noise, memory bank, torch global)
  memory_bank.safetensors  the FIFO bank's features
  state.json               step, data position, scheduler, optimizer hyper-parameters, bank ids, config
  manifest.json            sha256 and size of every file above; written last, so its presence means complete
The folder is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dr_train.data.shards import sha256_file

_STEP_DIR = re.compile(r"^step-(\d{8})$")
TENSOR_FILES = ("adapters", "optimizer", "rng", "memory_bank")


def save_checkpoint(folder: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int = 2) -> Path:
    """Write `tensors[name]` as `<name>.safetensors` for each name (the trainer's: TENSOR_FILES) and `state` as
    state.json."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    manifest = {}
    for name in tensors:
        path = tmp / f"{name}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors[name].items()}, str(path))
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    for path in sorted(tmp.iterdir()):
        manifest[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    with (tmp / "manifest.json").open("w") as f:
        json.dump({"step": step, "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def load_checkpoint(path: Path, names: tuple[str, ...] = TENSOR_FILES
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Verify every file against the manifest, then load `<name>.safetensors` for each of `names` and state.json.
    Any defect is a ValueError naming the file."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {path} is incomplete: {manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"checkpoint manifest {manifest_path} is unreadable: {e}") from None
    for name, info in manifest.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint file {file} is missing")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise ValueError(f"checkpoint file {file} is truncated or altered: {size} bytes, "
                             f"manifest says {info['bytes']}")
        if sha256_file(file) != info["sha256"]:
            raise ValueError(f"checkpoint file {file} is corrupt: its sha256 does not match the manifest")
    tensors = {}
    for name in names:
        file = path / f"{name}.safetensors"
        if file.name not in manifest:
            raise ValueError(f"checkpoint file {file} is not listed in {manifest_path}")
        try:
            tensors[name] = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint file {file} cannot be read: {e}") from None
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {path / 'state.json'} cannot be read: {e}") from None
    return tensors, state
