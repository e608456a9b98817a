"""Atomic, verifiable training checkpoints (safetensors + JSON; no pickle).

Layout of `<relation>/checkpoints/step-00000020/`:
  adapters.safetensors     every adapter's weights, keyed '<adapter>/<module>.lora_{A,B}.weight'
  optimizer.safetensors    AdamW moments and step per LoRA parameter, keyed '<param name>/<state>'
  rng.safetensors          generator states (HMT draws, noise, memory bank, torch global)
  memory_bank.safetensors  the FIFO bank's features
  state.json               step, data position, scheduler, optimizer hyper-parameters, bank ids, config
  manifest.json            sha256 and size of every file above; written last, so its presence means complete
The folder is written under a temporary name and renamed into place.

`CheckpointManager` collects the parts of a training state that save and load themselves (adapters, optimizer,
scheduler, RNG streams, memory bank, data stream), each registered once with where it goes, and writes or
restores them together (as torchtitan's CheckpointManager).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dr_train.io import atomic_path, sha256_file

_STEP_DIR = re.compile(r"^step-(\d{8})$")
TENSOR_FILES = ("adapters", "optimizer", "rng", "memory_bank")


def save_checkpoint(folder: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int = 2) -> Path:
    """Write `tensors[name]` as `<name>.safetensors` for each name (the trainer's: TENSOR_FILES) and `state` as
    state.json."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    with atomic_path(final) as tmp:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name in tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors[name].items()},
                      str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        manifest = {path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
                    for path in sorted(tmp.iterdir())}
        with (tmp / "manifest.json").open("w") as f:
            json.dump({"step": step, "files": manifest}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
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


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class CheckpointManager:
    """The parts of a run's state, registered once, saved and restored as one checkpoint in `folder`.

    `register(name, part, tensors=..., state=...)`: the part's state goes to the tensor file `tensors`
    (`<tensors>.safetensors`), to the state.json key `state`, or to both. Its `state_dict()` returns the tensors,
    the JSON-able state, or the pair (tensors, state) when it has both, and `load_state_dict` takes the same back.
    """

    def __init__(self, folder: Path, keep: int = 2):
        self.folder, self.keep = Path(folder), keep
        self.parts: dict[str, tuple[Stateful, str | None, str | None]] = {}

    def register(self, name: str, part: Stateful, tensors: str | None = None, state: str | None = None) -> None:
        assert name not in self.parts, f"checkpoint part {name!r} registered twice"
        assert tensors or state, f"checkpoint part {name!r} has nowhere to go"
        taken = {t for _, t, _ in self.parts.values()} | {s for _, _, s in self.parts.values()}
        assert not ({tensors, state} - {None}) & taken, f"checkpoint part {name!r} reuses a file or key"
        self.parts[name] = (part, tensors, state)

    def collect(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """Every part's state (on every rank: parts may gather across ranks)."""
        tensors, state = {}, {}
        for part, file, key in self.parts.values():
            value = part.state_dict()
            if file and key:
                tensors[file], state[key] = value
            elif file:
                tensors[file] = value
            else:
                state[key] = value
        return tensors, state

    def save(self, step: int, extra_state: dict, write: bool = True) -> Path:
        """Collect every part and, where `write` (the main rank), write step-<step>; returns its path."""
        tensors, state = self.collect()
        path = self.folder / f"step-{step:08d}"
        if write:
            path = save_checkpoint(self.folder, step, tensors, {"step": step, **extra_state, **state}, keep=self.keep)
        return path

    def read(self, path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """Verify and read a checkpoint written by `save` (nothing is restored yet)."""
        files = tuple(file for _, file, _ in self.parts.values() if file)
        return load_checkpoint(path, files)

    def restore(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict, path: Path) -> None:
        """Load every part, in registration order, from what `read` returned."""
        for name, (part, file, key) in self.parts.items():
            if key and key not in state:
                raise ValueError(f"checkpoint {path / 'state.json'} has no {key!r} entry (part {name})")
            if file and key:
                part.load_state_dict((tensors[file], state[key]))
            elif file:
                part.load_state_dict(tensors[file])
            else:
                part.load_state_dict(state[key])


class RngStreams:
    """Named random generators saved together as one tensor file; `None` stands for torch's global generator."""

    def __init__(self, **generators: torch.Generator | None):
        self.generators = generators

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: torch.get_rng_state() if g is None else g.get_state() for name, g in self.generators.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, g in self.generators.items():
            if name not in tensors:
                raise ValueError(f"checkpoint rng file has no {name!r} generator state")
            if g is None:
                torch.set_rng_state(tensors[name])
            else:
                g.set_state(tensors[name])
