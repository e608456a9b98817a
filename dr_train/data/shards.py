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
A dataset folder holds `manifest.json` (counts, shapes and the sha256 of every shard and of every sample's
members), `null_text.safetensors` (the empty prompt, for caption dropout) and `shards/*.tar`. Shards are written
under a temporary name and renamed into place, with a fixed mtime so the same samples always give the same bytes.

What the manifest promises is checked whenever a shard is read against it (`read_shard(..., entry=...)`: the
trainer's loader, `verify`, an ingest that keeps earlier samples): each sample's member checksum, latent shape and
relation as it streams, and the file's size and sha256 in the same single read; every array is finite and in
range (`check_sample`). A file the manifest names must lie inside the dataset folder (`dataset_file`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

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
    for name, dtype in ARRAY_FIELDS.items():    # before the ranges: NaN passes every comparison
        if np.issubdtype(dtype, np.floating) and not np.isfinite(getattr(sample, name)).all():
            bad(f"{name} holds NaN or infinite values")
    for name in MASK_FIELDS:
        m = getattr(sample, name)
        if m.shape != lat.shape[1:]:
            bad(f"{name} shape {m.shape} does not match the latent's (F, h, w) = {lat.shape[1:]}")
        if m.size and (float(m.min()) < 0 or float(m.max()) > 1):
            bad(f"{name} values must lie in [0, 1]")
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
    if not isinstance(meta, dict):
        raise ShardError(f"{where}: sample {key!r}: meta.json must hold a JSON object, got {type(meta).__name__}")
    return Sample(key=key, meta=meta, **arrays)


# ---- shards ------------------------------------------------------------------------------------------------
def members_sha256(members: dict[str, bytes]) -> str:
    """The checksum of one sample's tar members (suffix and bytes of each, in suffix order): the manifest records
    it per sample, so a damaged shard names the damaged sample."""
    h = hashlib.sha256()
    for suffix in sorted(members):
        h.update(f"{suffix}\0{len(members[suffix])}\0".encode())
        h.update(members[suffix])
    return h.hexdigest()


def write_shard(path: Path, samples: list[Sample]) -> dict:
    """Write samples as one tar, atomically (temporary name, fsync, rename). Returns its manifest entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [s.key for s in samples]
    assert len(set(keys)) == len(keys), f"duplicate keys in shard {path}"
    digests = []
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                if "." in sample.key:
                    raise ValueError(f"sample key {sample.key!r} must not contain '.' (WebDataset splits on it)")
                members = encode_sample(sample)
                digests.append(members_sha256(members))
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    info.uname = info.gname = "dr_train"
                    tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size,
            "samples": [{"key": s.key, "latent_shape": list(s.latent_shape), "source": s.meta.get("source", ""),
                         "relation": s.meta.get("relation", ""), "sha256": digest}
                        for s, digest in zip(samples, digests)]}


class _HashingReader:
    """A binary file that feeds every byte read through it to a sha256 and a byte count: a shard is checked in
    the same read that decodes it."""

    def __init__(self, f, sha, counter: list[int]):
        self.f, self.sha, self.counter = f, sha, counter

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.counter[0] += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) the rest of the file: the tar's end padding, or what follows a defect."""
        while self.read(1 << 20):
            pass


@dataclass
class FileDigest:
    """sha256 and size of a shard as `iter_shard_members` read it (complete once the iteration ended)."""
    sha: object = field(default_factory=hashlib.sha256)
    counter: list = field(default_factory=lambda: [0])

    @property
    def size(self) -> int:
        return self.counter[0]

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def iter_shard_members(path: Path, digest: FileDigest | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample, streamed with WebDataset's tar reader; with `digest`, every byte of
    the file (the part after a tar defect too) is hashed into it as it is read."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    try:
        with path.open("rb") as raw:
            f = raw if digest is None else _HashingReader(raw, digest.sha, digest.counter)
            try:
                yield from _member_groups(f, path)
            except (tarfile.TarError, EOFError, ValueError) as e:
                if digest is not None:
                    f.drain()
                raise ShardError(f"shard {path} is not a readable tar file: {e}") from None
            if digest is not None:
                f.drain()
    except OSError as e:
        raise ShardError(f"shard {path} cannot be read: {e}") from None


def _member_groups(f, path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    from webdataset.tariterators import group_by_keys  # deferred: webdataset is an optional dependency
    from webdataset.tariterators import tar_file_iterator

    files = ({**member, "__url__": str(path)} for member in tar_file_iterator(f))
    for group in group_by_keys(files, lcase=False):
        key = group.pop("__key__")
        group.pop("__url__", None)
        yield key, group


def _raise(message: str) -> None:
    raise ShardError(message)


def shard_file_problem(path: Path, entry: dict) -> str | None:
    """Why a shard file cannot match its manifest entry without reading it (missing, another size), or None."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated?)"
    return None


class _EntryCheck:
    """One shard held to its manifest entry while it streams (see read_shard)."""

    def __init__(self, path: Path, entry: dict, keys: set[str] | None):
        self.path, self.entry = path, entry
        self.expected = {s["key"]: s for s in entry["samples"]}
        self.wanted = set(self.expected) if keys is None else set(keys) & set(self.expected)
        self.seen: set[str] = set()
        self.bad_checksums = 0

    def members(self, key: str, members: dict[str, bytes]) -> None:
        want = self.expected.get(key)
        if want is None:
            raise ShardError(f"{self.path}: sample {key!r} is not in the manifest")
        if key in self.seen:
            raise ShardError(f"{self.path}: sample {key!r} appears twice in the shard")
        self.seen.add(key)
        if want.get("sha256") and members_sha256(members) != want["sha256"]:
            self.bad_checksums += 1
            raise ShardError(f"{self.path}: sample {key!r}: sha256 of its members does not match the manifest (the "
                             f"shard was altered or corrupted)")

    def sample(self, sample: Sample) -> None:
        want = self.expected[sample.key]
        if list(sample.latent_shape) != list(want["latent_shape"]):
            raise ShardError(f"{self.path}: sample {sample.key!r} has latent shape {list(sample.latent_shape)}, the "
                             f"manifest says {list(want['latent_shape'])}")
        relation = self.entry.get("relation")
        if relation and sample.meta.get("relation") != relation:
            raise ShardError(f"{self.path}: sample {sample.key!r} is labelled {sample.meta.get('relation')!r}, the "
                             f"manifest files it under {relation!r}")

    def trusted(self, key: str) -> bool:
        """Whether the sample was checked on its own (a manifest entry with its checksum)."""
        return bool(self.expected[key].get("sha256"))

    def finish(self, digest: FileDigest, held: list[str], report: Callable[[str], None]) -> bool:
        """The samples the entry lists that the file lacked, and the whole file's sha256: True when it matched."""
        for key in sorted(self.wanted - self.seen):
            report(f"{self.path}: sample {key!r} listed in the manifest is missing from the shard")
        if digest.hexdigest() == self.entry["sha256"] and digest.size == self.entry["bytes"]:
            return True
        if held:
            report(f"{self.path}: sha256 does not match the manifest (the file was altered or corrupted); samples "
                   f"{', '.join(repr(k) for k in held)} cannot be told from the damaged ones (the manifest predates "
                   f"per-sample checksums: prepare the dataset again)")
        elif not self.bad_checksums:     # else the damaged samples were named already
            report(f"{self.path}: sha256 does not match the manifest (the file was altered or corrupted)")
        return False


def read_shard(path: Path, keys: set[str] | None = None, text_shape=None, latent_channels=None,
               entry: dict | None = None, on_corrupt: Callable[[str], None] | None = None) -> Iterator[Sample]:
    """Decoded, checked samples of one shard (only `keys` when given; the others are not decoded).

    With `entry`, the shard's manifest entry, the file is held to it in the same single read: its size first,
    then each sample's member checksum, latent shape and relation as it streams, then the samples it lists that
    the file lacks and the whole file's sha256 (a sample whose entry has no checksum, from an older manifest, is
    held back until the file checked out). A defect raises ShardError naming the shard and the sample; with
    `on_corrupt`, the message goes to `on_corrupt` instead and the sample is left out (a file that cannot be read
    any further ends the shard there)."""
    path = Path(path)
    report = on_corrupt or _raise
    check = None if entry is None else _EntryCheck(path, entry, keys)
    if check is not None and (problem := shard_file_problem(path, entry)):
        report(problem)
        return
    digest = None if check is None else FileDigest()
    held: list[Sample] = []
    members_of = iter_shard_members(path, digest)
    while True:
        try:
            key, members = next(members_of)
        except StopIteration:
            break
        except ShardError as e:
            report(str(e))
            return
        if keys is not None and key not in keys:
            continue
        sample = _checked_sample(path, key, members, check, text_shape, latent_channels, report)
        if sample is not None and check is not None and not check.trusted(key):
            held.append(sample)
        elif sample is not None:
            yield sample
    if check is None or check.finish(digest, [s.key for s in held], report):
        yield from held


def _checked_sample(path: Path, key: str, members: dict[str, bytes], check: _EntryCheck | None, text_shape,
                    latent_channels, report: Callable[[str], None]) -> Sample | None:
    try:
        if check is not None:
            check.members(key, members)
        sample = decode_sample(key, members, str(path))
        check_sample(sample, str(path), text_shape, latent_channels)
        if check is not None:
            check.sample(sample)
        return sample
    except ShardError as e:
        report(str(e))
        return None


# ---- manifest ----------------------------------------------------------------------------------------------
def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST


def dataset_file(root: Path, name, what: str = "") -> Path:
    """`root / name` for a file a manifest names; a ValueError (starting with `what`) when `name` is not a relative
    path that stays inside the dataset folder: absolute paths, '..' steps and symbolic links leading out are
    refused."""
    label = f"{what}: " if what else ""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise ValueError(f"{label}file name {name!r} must be a non-empty relative path inside the dataset folder")
    posix = PurePosixPath(name)
    if posix.is_absolute() or ".." in posix.parts or "\\" in name:
        raise ValueError(f"{label}{name!r} leaves the dataset folder {root} (absolute paths and '..' are refused)")
    path = Path(root) / name
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ValueError(f"{label}{name!r} leads outside the dataset folder {root} through a symbolic link")
    return path


def load_manifest(root: Path) -> dict:
    """The dataset's manifest, checked: every key the readers use present and well-formed, every file it names
    inside the dataset folder; a ValueError naming the file and the defect otherwise."""
    path = manifest_path(root)
    if not path.is_file():
        raise ValueError(f"{root} is not a prepared dataset: {path} is missing (run launch/prepare.py)")
    manifest = read_json(path, "dataset manifest")
    if not isinstance(manifest, dict):
        raise ValueError(f"dataset manifest {path} must be a JSON object, got {_json_type(manifest)}")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"dataset manifest {path} has format {manifest.get('format')!r} version "
                         f"{manifest.get('version')!r}; this code reads {FORMAT!r} version {VERSION}: prepare the "
                         f"videos again into a new folder (launch/prepare.py)")
    _check_manifest(manifest, Path(root), f"dataset manifest {path}")
    return manifest


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_manifest(m: dict, root: Path, where: str) -> None:
    def bad(msg: str):
        raise ValueError(f"{where}: {msg}")

    for key, kind in (("encoder", dict), ("video", dict), ("relations", dict), ("shards", list)):
        if key not in m:
            bad(f"lacks {key!r}")
        if not isinstance(m[key], kind):
            bad(f"{key!r} must be {_json_type(kind())}, got {_json_type(m[key])}")
    for key in ("latent_channels", "text_tokens", "text_dim"):
        if not _is_int(m["encoder"].get(key), 1):
            bad(f"encoder.{key} must be a positive integer, got {m['encoder'].get(key)!r}")
    if "null_text" in m:
        dataset_file(root, m["null_text"], f"{where}: null_text")
    owners: dict[str, str] = {}
    for i, entry in enumerate(m["shards"]):
        _check_shard_entry(entry, f"shards[{i}]", root, owners, bad, where)
    for name, rel in m["relations"].items():
        if not isinstance(rel, dict) or not _is_int(rel.get("samples"), 0) or not isinstance(rel.get("shards"), list):
            bad(f"relations.{name} must be an object with a 'samples' count and a 'shards' list, got {rel!r:.80}")
        for shard in rel["shards"]:
            dataset_file(root, shard, f"{where}: relations.{name}.shards")


def _check_shard_entry(entry, at: str, root: Path, owners: dict[str, str], bad, where: str) -> None:
    if not isinstance(entry, dict):
        bad(f"{at} must be an object, got {_json_type(entry)}")
    for key in ("name", "relation"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            bad(f"{at}.{key} must be a non-empty string, got {entry.get(key)!r}")
    dataset_file(root, entry["name"], f"{where}: {at}.name")
    at = f"{at} ({entry['name']})"
    if not isinstance(entry.get("samples"), list):
        bad(f"{at}.samples must be a list, got {entry.get('samples')!r:.80}")
    if not _is_int(entry.get("bytes"), 0):
        bad(f"{at}.bytes must be a byte count, got {entry.get('bytes')!r}")
    if entry["samples"] and not _is_sha256(entry.get("sha256")):
        bad(f"{at}.sha256 must be 64 lowercase hex digits, got {entry.get('sha256')!r}")
    skipped = entry.get("skipped", [])
    if not isinstance(skipped, list) or not all(isinstance(s, dict) and isinstance(s.get("source"), str)
                                                for s in skipped):
        bad(f"{at}.skipped must be a list of objects with a 'source', got {skipped!r:.80}")
    if not isinstance(entry.get("clips", {}), dict):
        bad(f"{at}.clips must be an object, got {entry.get('clips')!r:.80}")
    for j, s in enumerate(entry["samples"]):
        here = f"{at}.samples[{j}]"
        if not isinstance(s, dict):
            bad(f"{here} must be an object, got {_json_type(s)}")
        key = s.get("key")
        if not isinstance(key, str) or not key or "." in key or "/" in key:
            bad(f"{here}.key must be a non-empty name without '.' or '/', got {key!r}")
        shape = s.get("latent_shape")
        if not isinstance(shape, list) or len(shape) != 4 or not all(_is_int(v, 1) for v in shape):
            bad(f"{here}.latent_shape must be 4 positive integers (C, F, h, w), got {shape!r}")
        if "sha256" in s and not _is_sha256(s["sha256"]):
            bad(f"{here}.sha256 must be 64 lowercase hex digits, got {s['sha256']!r}")
        if key in owners:
            bad(f"sample {key!r} is listed twice, in {owners[key]} and {entry['name']}")
        owners[key] = entry["name"]


def save_manifest(root: Path, manifest: dict) -> Path:
    return atomic_write_text(manifest_path(root), json.dumps(manifest, indent=1, sort_keys=True))


def new_manifest(encoder: dict, video: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, "encoder": encoder, "video": video, "relations": {},
            "shards": [], "skipped": []}


def text_shape(manifest: dict) -> tuple[int, int]:
    enc = manifest["encoder"]
    return int(enc["text_tokens"]), int(enc["text_dim"])


def verify_dataset(root: Path, deep: bool = True) -> tuple[list[str], dict]:
    """Re-check a dataset against its manifest: each shard's size and sha256, and (deep, in the same read) every
    sample's checksum, members, shapes and values. Returns (problems, counts); an empty problem list means the
    dataset is intact."""
    root = Path(root)
    manifest = load_manifest(root)
    problems: list[str] = []
    counts = {"shards": 0, "samples": 0}
    null = dataset_file(root, manifest.get("null_text", NULL_TEXT))
    if not null.is_file():
        problems.append(f"{null}: missing (the empty-prompt embedding for caption dropout)")
    elif manifest.get("null_text_sha256") and sha256_file(null) != manifest["null_text_sha256"]:
        problems.append(f"{null}: sha256 does not match the manifest")
    for entry in manifest["shards"]:
        if not entry["samples"]:          # every clip of this shard was skipped at ingest: no file
            continue
        path = dataset_file(root, entry["name"])
        counts["shards"] += 1
        if deep:
            counts["samples"] += sum(1 for _ in read_shard(path, None, text_shape(manifest),
                                                           manifest["encoder"]["latent_channels"], entry,
                                                           problems.append))
            continue
        problem = shard_file_problem(path, entry)
        if problem is None and sha256_file(path) != entry["sha256"]:
            problem = f"{path}: sha256 does not match the manifest (the file was altered or corrupted)"
        problems += [problem] if problem else []
        counts["samples"] += 0 if problem else len(entry["samples"])
    return problems, counts


def save_null_text(root: Path, text_embed_LD: np.ndarray, text_mask_L: np.ndarray) -> str:
    """The empty prompt's embedding (caption dropout trains some steps unconditioned); returns its sha256."""
    path = Path(root) / NULL_TEXT
    with atomic_path(path) as tmp:
        save_file({"text_embed": np.ascontiguousarray(text_embed_LD, dtype=np.float32),
                   "text_mask": np.ascontiguousarray(text_mask_L, dtype=np.bool_)}, str(tmp))
    return sha256_file(path)


def load_null_text(root: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    path = dataset_file(root, manifest.get("null_text", NULL_TEXT), f"{manifest_path(root)}: null_text")
    try:
        tensors = load_file(str(path))
        embed, mask = tensors["text_embed"], tensors["text_mask"]
    except (OSError, SafetensorError, KeyError) as e:
        raise ValueError(f"{path}: cannot read the empty-prompt embedding ({e!r})") from None
    if tuple(embed.shape) != text_shape(manifest) or mask.shape != embed.shape[:1]:
        raise ValueError(f"{path}: embedding {embed.shape} / mask {mask.shape} do not match the manifest's text "
                         f"shape {text_shape(manifest)}")
    return embed, mask
