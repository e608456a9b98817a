"""WebDataset tar shards of pre-encoded training samples, the dataset manifest, and its verification.

One sample is a group of tar members sharing a key (the WebDataset convention):

  <key>.latent_mean.npy     float32 (C, F, h, w)  VAE posterior mean, in the transformer's normalised latent space
  <key>.latent_logvar.npy   float32 (C, F, h, w)  VAE posterior log-variance (a latent is drawn per step)
  <key>.mask_subject1.npy   float32 (F, h, w)     latent-resolution subject masks in [0, 1]
  <key>.mask_subject2.npy   float32 (F, h, w)
  <key>.mask_subject1_maxpool.npy, <key>.mask_subject2_maxpool.npy   float32 (F, h, w)   the same masks pooled
                            with the official code's 8x8 max instead of the mean (`loss.mode: official`)
  <key>.text_embed.npy      float32 (L, D)        T5 embedding of the sample's prompt
  <key>.text_mask.npy       bool    (L,)          its attention mask
  <key>.preview.npy         uint8   (K, ph, pw, 3) a few downscaled frames, for contact sheets
  <key>.preview_masks.npy   uint8   (K, 2, ph, pw) the pixel subject masks of those frames (0/255)
  <key>.meta.json           relation, source video, frame count, resolution, fps, format version, ...

Arrays are .npy read with allow_pickle=False; any other member (a .pkl, a .pyd, ...) makes the shard invalid.
A dataset folder holds `manifest.json` (counts, shapes and the sha256 of every shard), `null_text.safetensors`
(the empty prompt, for caption dropout) and `shards/*.tar`. Shards are written under a temporary name and
renamed into place, with a fixed mtime so the same samples always give the same bytes.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from dr_train.io import atomic_path, atomic_write_text, read_json, sha256_file

FORMAT = "dr-train-latents"
VERSION = 2                     # 2: the max-pooled masks
MANIFEST = "manifest.json"
NULL_TEXT = "null_text.safetensors"
ARRAY_FIELDS = {
    "latent_mean": np.float32, "latent_logvar": np.float32, "mask_subject1": np.float32,
    "mask_subject2": np.float32, "mask_subject1_maxpool": np.float32, "mask_subject2_maxpool": np.float32,
    "text_embed": np.float32, "text_mask": np.bool_, "preview": np.uint8,
    "preview_masks": np.uint8,
}
MEMBERS = {f"{name}.npy" for name in ARRAY_FIELDS} | {"meta.json"}
MASK_FIELDS = ("mask_subject1", "mask_subject2", "mask_subject1_maxpool", "mask_subject2_maxpool")


class ShardError(ValueError):
    """A shard or a sample in it is unreadable or malformed; the message names the shard and the sample."""


@dataclass
class Sample:
    key: str
    latent_mean: np.ndarray
    latent_logvar: np.ndarray
    mask_subject1: np.ndarray
    mask_subject2: np.ndarray
    mask_subject1_maxpool: np.ndarray
    mask_subject2_maxpool: np.ndarray
    text_embed: np.ndarray
    text_mask: np.ndarray
    preview: np.ndarray
    preview_masks: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latent_mean.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_FIELDS}


def check_sample(sample: Sample, where: str, text_shape: tuple[int, int] | None = None,
                 latent_channels: int | None = None) -> None:
    """Shapes, dtypes and value ranges of one sample; ShardError naming `where` on the first defect."""
    def bad(msg: str):
        raise ShardError(f"{where}: sample {sample.key!r}: {msg}")

    for name, dtype in ARRAY_FIELDS.items():
        arr = getattr(sample, name)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
            bad(f"{name} must be a {np.dtype(dtype).name} array, got {getattr(arr, 'dtype', type(arr))}")
    lat = sample.latent_mean
    if lat.ndim != 4:
        bad(f"latent_mean must be (C, F, h, w), got shape {lat.shape}")
    if latent_channels is not None and lat.shape[0] != latent_channels:
        bad(f"latent_mean has {lat.shape[0]} channels, the dataset's VAE has {latent_channels}")
    if sample.latent_logvar.shape != lat.shape:
        bad(f"latent_logvar shape {sample.latent_logvar.shape} differs from latent_mean {lat.shape}")
    for name in MASK_FIELDS:
        m = getattr(sample, name)
        if m.shape != lat.shape[1:]:
            bad(f"{name} shape {m.shape} does not match the latent's (F, h, w) = {lat.shape[1:]}")
        if m.size and (float(m.min()) < 0 or float(m.max()) > 1):
            bad(f"{name} values must lie in [0, 1]")
    for name in ("latent_mean", "latent_logvar", "text_embed"):
        if not np.isfinite(getattr(sample, name)).all():
            bad(f"{name} holds NaN or infinite values")
    if sample.text_embed.ndim != 2 or sample.text_mask.shape != sample.text_embed.shape[:1]:
        bad(f"text_embed (L, D) {sample.text_embed.shape} and text_mask (L,) {sample.text_mask.shape} disagree")
    if text_shape is not None and tuple(sample.text_embed.shape) != tuple(text_shape):
        bad(f"text_embed shape {sample.text_embed.shape}, the dataset's text encoder gives {tuple(text_shape)}")
    pv, pm = sample.preview, sample.preview_masks
    if pv.ndim != 4 or pv.shape[-1] != 3 or pm.shape != (pv.shape[0], 2, *pv.shape[1:3]):
        bad(f"preview {pv.shape} must be (K, h, w, 3) and preview_masks {pm.shape} (K, 2, h, w)")


# ---- one sample <-> tar members ----------------------------------------------------------------------------
def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: Sample) -> dict[str, bytes]:
    """Member suffix -> bytes for one sample."""
    out = {f"{name}.npy": _npy_bytes(arr) for name, arr in sample.arrays().items()}
    out["meta.json"] = json.dumps(sample.meta, sort_keys=True).encode()
    return out


def decode_sample(key: str, members: dict[str, bytes], where: str) -> Sample:
    """Tar members of one key -> Sample. Unknown members (pickles included) and missing members are errors."""
    unknown = sorted(set(members) - MEMBERS)
    if unknown:
        raise ShardError(f"{where}: sample {key!r} has unexpected member(s) {', '.join(unknown)}; only .npy arrays "
                         f"and meta.json are allowed (pickled data is never loaded)")
    missing = sorted(MEMBERS - set(members))
    if missing:
        raise ShardError(f"{where}: sample {key!r} lacks {', '.join(missing)}")
    arrays = {}
    for name in ARRAY_FIELDS:
        try:
            arrays[name] = np.load(io.BytesIO(members[f"{name}.npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ShardError(f"{where}: sample {key!r}: {name}.npy is not a plain numpy array ({e})") from None
    try:
        meta = json.loads(members["meta.json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}: sample {key!r}: meta.json is not valid JSON ({e})") from None
    return Sample(key=key, meta=meta, **arrays)


# ---- shards ------------------------------------------------------------------------------------------------
def write_shard(path: Path, samples: list[Sample]) -> dict:
    """Write samples as one tar, atomically (temporary name, fsync, rename). Returns its manifest entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [s.key for s in samples]
    assert len(set(keys)) == len(keys), f"duplicate keys in shard {path}"
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                if "." in sample.key:
                    raise ValueError(f"sample key {sample.key!r} must not contain '.' (WebDataset splits on it)")
                for suffix, data in encode_sample(sample).items():
                    info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    info.uname = info.gname = "dr_train"
                    tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size,
            "samples": [{"key": s.key, "latent_shape": list(s.latent_shape), "source": s.meta.get("source", ""),
                         "relation": s.meta.get("relation", "")} for s in samples]}


def iter_shard_members(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample, streamed with WebDataset's tar reader."""
    from webdataset.tariterators import group_by_keys  # deferred: webdataset is an optional dependency
    from webdataset.tariterators import tar_file_iterator

    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    try:
        with path.open("rb") as f:
            files = ({**member, "__url__": str(path)} for member in tar_file_iterator(f))
            for group in group_by_keys(files, lcase=False):
                key = group.pop("__key__")
                group.pop("__url__", None)
                yield key, group
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"shard {path} is not a readable tar file: {e}") from None


def read_shard(path: Path, keys: set[str] | None = None, text_shape=None, latent_channels=None) -> Iterator[Sample]:
    """Decoded, checked samples of one shard (only `keys` when given; the others are not decoded)."""
    for key, members in iter_shard_members(path):
        if keys is not None and key not in keys:
            continue
        sample = decode_sample(key, members, str(path))
        check_sample(sample, str(path), text_shape, latent_channels)
        yield sample


# ---- manifest ----------------------------------------------------------------------------------------------
def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST


def load_manifest(root: Path) -> dict:
    path = manifest_path(root)
    if not path.is_file():
        raise ValueError(f"{root} is not a prepared dataset: {path} is missing (run launch/prepare.py)")
    manifest = read_json(path, "dataset manifest")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"dataset manifest {path} has format {manifest.get('format')!r} version "
                         f"{manifest.get('version')!r}; this code reads {FORMAT!r} version {VERSION}: prepare the "
                         f"videos again into a new folder (launch/prepare.py)")
    return manifest


def save_manifest(root: Path, manifest: dict) -> Path:
    return atomic_write_text(manifest_path(root), json.dumps(manifest, indent=1, sort_keys=True))


def new_manifest(encoder: dict, video: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, "encoder": encoder, "video": video, "relations": {},
            "shards": [], "skipped": []}


def text_shape(manifest: dict) -> tuple[int, int]:
    enc = manifest["encoder"]
    return int(enc["text_tokens"]), int(enc["text_dim"])


def verify_dataset(root: Path, deep: bool = True) -> tuple[list[str], dict]:
    """Re-check a dataset against its manifest: each shard's size and sha256, and (deep) every sample's members,
    shapes and values. Returns (problems, counts); an empty problem list means the dataset is intact."""
    root = Path(root)
    manifest = load_manifest(root)
    problems: list[str] = []
    counts = {"shards": 0, "samples": 0}
    null = root / manifest.get("null_text", NULL_TEXT)
    if not null.is_file():
        problems.append(f"{null}: missing (the empty-prompt embedding for caption dropout)")
    elif manifest.get("null_text_sha256") and sha256_file(null) != manifest["null_text_sha256"]:
        problems.append(f"{null}: sha256 does not match the manifest")
    for entry in manifest["shards"]:
        if not entry["samples"]:          # every clip of this shard was skipped at ingest: no file
            continue
        path = root / entry["name"]
        counts["shards"] += 1
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)")
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 does not match the manifest (the file was altered or corrupted)")
            continue
        if not deep:
            counts["samples"] += len(entry["samples"])
            continue
        expected = {s["key"]: s for s in entry["samples"]}
        seen = set()
        try:
            for sample in read_shard(path, None, text_shape(manifest), manifest["encoder"].get("latent_channels")):
                seen.add(sample.key)
                want = expected.get(sample.key)
                if want is None:
                    problems.append(f"{path}: sample {sample.key!r} is not in the manifest")
                elif list(sample.latent_shape) != want["latent_shape"]:
                    problems.append(f"{path}: sample {sample.key!r} has latent shape {list(sample.latent_shape)}, "
                                    f"the manifest says {want['latent_shape']}")
        except ShardError as e:
            problems.append(str(e))
            continue
        for key in sorted(set(expected) - seen):
            problems.append(f"{path}: sample {key!r} listed in the manifest is missing from the shard")
        counts["samples"] += len(seen)
    return problems, counts


def save_null_text(root: Path, text_embed_LD: np.ndarray, text_mask_L: np.ndarray) -> str:
    """The empty prompt's embedding (caption dropout trains some steps unconditioned); returns its sha256."""
    path = Path(root) / NULL_TEXT
    with atomic_path(path) as tmp:
        save_file({"text_embed": np.ascontiguousarray(text_embed_LD, dtype=np.float32),
                   "text_mask": np.ascontiguousarray(text_mask_L, dtype=np.bool_)}, str(tmp))
    return sha256_file(path)


def load_null_text(root: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    path = Path(root) / manifest.get("null_text", NULL_TEXT)
    try:
        tensors = load_file(str(path))
        embed, mask = tensors["text_embed"], tensors["text_mask"]
    except (OSError, SafetensorError, KeyError) as e:
        raise ValueError(f"{path}: cannot read the empty-prompt embedding ({e!r})") from None
    if tuple(embed.shape) != text_shape(manifest) or mask.shape != embed.shape[:1]:
        raise ValueError(f"{path}: embedding {embed.shape} / mask {mask.shape} do not match the manifest's text "
                         f"shape {text_shape(manifest)}")
    return embed, mask
