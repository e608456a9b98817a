"""The identity of a base model: what a trained LoRA, a checkpoint and a generated video belong to. A relation's
DONE.json, its checkpoints and every generated video's request record it, so that nothing made on one base is
reused on another (a retrained synth base keeps the preset's name). Torch-free: the Ray driver reads it."""
from __future__ import annotations

import hashlib
from pathlib import Path

PRESETS = ("tiny", "synth")                                 # the bases built into dr-train
SYNTH_DIR = Path(__file__).resolve().parent / "model" / "synth_base"
SYNTH_MANIFEST = "SHA256SUMS"
ENCODER_PARTS = ("vae", "text_encoder", "tokenizer")        # what encoded latents and text embeddings depend on
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_identity(preset: str, parts: tuple[str, ...] = ()) -> str:
    """'tiny' (built from code); 'synth:<digest of its SHA256SUMS>' (which lists every file's sha256); for a
    diffusers folder 'folder:<digest>' over the text of its JSON and tokenizer files and the names and sizes of its
    weight files. Weights changed in place with the same sizes are not seen there: hashing tens of GB at every
    start would cost minutes. `parts` (subfolders such as vae, text_encoder) limits the digest to them: what encoded
    latents depend on, which a retrained transformer leaves valid."""
    def kept(name: str) -> bool:
        return not parts or name.split("/", 1)[0] in parts

    if preset == "tiny":
        return "tiny"
    if preset == "synth":
        manifest = SYNTH_DIR / SYNTH_MANIFEST
        if not manifest.is_file():
            raise ValueError(f"synth base {SYNTH_DIR} has no {SYNTH_MANIFEST}: it is missing or incomplete (make it "
                             f"with launch/pretrain_base.py)")
        lines = [l for l in manifest.read_text().splitlines(keepends=True) if kept(l.partition("  ")[2])]
        return f"synth:{_short(''.join(lines))}"
    folder = Path(preset)
    if not folder.is_dir():
        raise ValueError(f"model preset {preset!r} is neither 'tiny', 'synth' nor an existing folder")
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and kept(p.relative_to(folder).as_posix())):
        name = path.relative_to(folder).as_posix()
        if path.suffix in _WEIGHT_SUFFIXES:
            lines.append(f"{name} {path.stat().st_size}")
        elif path.suffix in (".json", ".txt", ".model"):
            lines.append(f"{name} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return f"folder:{_short(chr(10).join(lines))}"


def describe_mismatch(what: str, recorded: str, preset: str, current: str) -> str:
    """The one line saying that `what` was made on another base than the one this run loads."""
    return (f"{what} was made on base {recorded}, but model.preset {preset!r} is base {current} now (a retrained or "
            f"another model)")
