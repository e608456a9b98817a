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

from dr_train.io import atomic_path, read_json, sha256_file

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
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step of a `step-NNNNNNNN` checkpoint folder."""
    match = _STEP_DIR.match(path.name)
    assert match, f"{path} is not a checkpoint folder"
    return int(match.group(1))


def find_checkpoint(folder: Path, name: str) -> Path:
    """The complete checkpoint `name` ("step-4", "step-00000004" or "4") in `folder`, or a ValueError listing
    the ones there are."""
    match = re.fullmatch(r"(?:step-)?(\d+)", name.strip())
    if not match:
        raise ValueError(f"checkpoint name {name!r} is not of the form step-N (e.g. step-40)")
    found = {checkpoint_step(p): p for p in list_checkpoints(folder)}
    step = int(match.group(1))
    if step not in found:
        there = ", ".join(f"step-{s}" for s in found) or "none"
        raise ValueError(f"{folder} has no complete checkpoint step-{step} (complete checkpoints: {there})")
    return found[step]


def _manifest_files(path: Path) -> dict[str, dict]:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {path} is incomplete: {manifest_path} is missing")
    manifest = read_json(manifest_path, "checkpoint manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("sha256"), str) and type(info.get("bytes")) is int
            for info in files.values()):
        raise ValueError(f"checkpoint manifest {manifest_path} is malformed: it needs "
                         f'{{"files": {{<file>: {{"sha256": <hex>, "bytes": <int>}}}}}}')
    if "state.json" not in files:
        raise ValueError(f"checkpoint manifest {manifest_path} does not list state.json")
    return files


def _check_file(file: Path, info: dict) -> None:
    if not file.is_file():
        raise ValueError(f"checkpoint file {file} is missing")
    size = file.stat().st_size
    if size != info["bytes"]:
        raise ValueError(f"checkpoint file {file} is truncated or altered: {size} bytes, "
                         f"manifest says {info['bytes']}")
    if sha256_file(file) != info["sha256"]:
        raise ValueError(f"checkpoint file {file} is corrupt: its sha256 does not match the manifest")


def _read_state(path: Path) -> dict:
    """state.json of a checkpoint: a JSON object whose "step" is the folder's step."""
    file = path / "state.json"
    state = read_json(file, "checkpoint file")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint file {file} holds a JSON {type(state).__name__}, not an object")
    if "step" not in state:
        raise ValueError(f"checkpoint file {file} has no 'step' entry")
    step = state["step"]
    if type(step) is not int or step < 0:
        raise ValueError(f"checkpoint file {file}: 'step' is {step!r}, not a whole number of steps")
    if _STEP_DIR.match(path.name) and step != checkpoint_step(path):
        raise ValueError(f"checkpoint file {file}: 'step' is {step}, but the folder is {path.name}")
    return state


def verify_checkpoint(path: Path) -> dict:
    """Check every file of a checkpoint against its manifest and state.json's step; returns state.json. Any
    defect is a ValueError naming the file."""
    return _verify(path)[1]


def _verify(path: Path) -> tuple[dict[str, dict], dict]:
    files = _manifest_files(path)
    for name, info in files.items():
        _check_file(path / name, info)
    return files, _read_state(path)


def newest_verified(paths: list[Path]) -> Path | None:
    """The newest of `paths` (oldest first, as list_checkpoints gives them) that verifies, None if none does."""
    for path in reversed(paths):
        try:
            verify_checkpoint(path)
        except ValueError:
            continue
        return path
    return None


def set_aside_after(folder: Path, step: int) -> list[Path]:
    """Move the complete checkpoints newer than `step` to `<folder>/superseded/` (a run resumed from an older
    checkpoint writes its own; these are kept, out of the way, not deleted). Returns where they went."""
    moved = []
    for path in list_checkpoints(folder):
        if checkpoint_step(path) <= step:
            continue
        target = folder / "superseded" / path.name
        n = 0
        while target.exists():
            n += 1
            target = folder / "superseded" / f"{path.name}.{n}"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        moved.append(target)
    return moved


def load_checkpoint(path: Path, names: tuple[str, ...] = TENSOR_FILES
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Verify every file against the manifest, then load `<name>.safetensors` for each of `names` and state.json.
    Any defect is a ValueError naming the file."""
    files, state = _verify(path)
    tensors = {}
    for name in names:
        file = path / f"{name}.safetensors"
        if file.name not in files:
            raise ValueError(f"checkpoint file {file} is not listed in {path / 'manifest.json'}")
        try:
            tensors[name] = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint file {file} cannot be read: {e}") from None
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
        """Load every part, in registration order, from what `read` returned; a part that cannot take its saved
        state is a ValueError naming the checkpoint file(s) it came from."""
        for name, (part, file, key) in self.parts.items():
            if key and key not in state:
                raise ValueError(f"checkpoint file {path / 'state.json'} has no {key!r} entry (part {name})")
            try:
                if file and key:
                    part.load_state_dict((tensors[file], state[key]))
                elif file:
                    part.load_state_dict(tensors[file])
                else:
                    part.load_state_dict(state[key])
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                if isinstance(e, ValueError) and str(path) in str(e):
                    raise                   # the part named the file itself
                sources = [f"{path / (file + '.safetensors')}"] if file else []
                sources += [f"{path / 'state.json'} entry {key!r}"] if key else []
                detail = " ".join(f"{type(e).__name__}: {e}".split())
                raise ValueError(f"checkpoint part {name} cannot be restored from {' and '.join(sources)}: "
                                 f"{detail}") from None


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
