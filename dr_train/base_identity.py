"""The identity of a base model: what a trained LoRA, a checkpoint and a generated video belong to. A relation's
DONE.json, its checkpoints and every generated video's request record it, so that nothing made on one base is
reused on another (a retrained synth base keeps the preset's name). Torch-free: the Ray driver reads it."""
from __future__ import annotations

import hashlib
from pathlib import Path

SYNTH_DIR = Path(__file__).resolve().parent / "model" / "synth_base"
SYNTH_MANIFEST = "SHA256SUMS"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_identity(preset: str) -> str:
    """'tiny' (built from code); 'synth:<digest of its SHA256SUMS>' (which lists every file's sha256); for a
    diffusers folder 'folder:<digest>' over the text of its JSON and tokenizer files and the names and sizes of its
    weight files. Weights changed in place with the same sizes are not seen there: hashing tens of GB at every
    start would cost minutes."""
    if preset == "tiny":
        return "tiny"
    if preset == "synth":
        manifest = SYNTH_DIR / SYNTH_MANIFEST
        if not manifest.is_file():
            raise ValueError(f"synth base {SYNTH_DIR} has no {SYNTH_MANIFEST}: it is missing or incomplete (make it "
                             f"with launch/pretrain_base.py)")
        return f"synth:{_short(manifest.read_text())}"
    folder = Path(preset)
    if not folder.is_dir():
        raise ValueError(f"model preset {preset!r} is neither 'tiny', 'synth' nor an existing folder")
    parts = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.suffix in _WEIGHT_SUFFIXES:
            parts.append(f"{name} {path.stat().st_size}")
        elif path.suffix in (".json", ".txt", ".model"):
            parts.append(f"{name} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return f"folder:{_short(chr(10).join(parts))}"


def describe_mismatch(what: str, recorded: str, preset: str, current: str) -> str:
    """The one line saying that `what` was made on another base than the one this run loads."""
    return (f"{what} was made on base {recorded}, but model.preset {preset!r} is base {current} now (a retrained or "
            f"another model)")
