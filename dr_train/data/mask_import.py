"""Subject masks stored as per-frame colour-coded PNG folders, the format the official DreamRelation code ships.

One PNG per video frame (`frame0.png`, `frame1.png`, ...), black background, each subject painted in its own flat
colour. The official loader takes the distinct non-black colours of the first frame and orders the subjects by
ascending (R, G, B) value; it does not fix the colours themselves. Here the colours are a parameter: explicit
colours (default subject1 red, subject2 green) or `"auto"`, which reproduces the official ordering.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dr_train.masks import sorted_frame_files

log = logging.getLogger(__name__)

SUBJECTS = ("subject1", "subject2")
DEFAULT_COLOURS = ((255, 0, 0), (0, 255, 0))
_NUMBER = re.compile(r"(\d+)(?!.*\d)")
_SAVED_NAME = re.compile(r"frame\d{5}\.png")


@dataclass
class MaskClip:
    masks: np.ndarray                    # (N, 2, H, W) float32 in {0, 1}
    empty_frames: dict[str, list[int]]   # subject -> clip positions (0-based) where its mask is empty
    source: Path


def frame_number(path: Path) -> int:
    """The last number in the file name: frame00012.png -> 12."""
    match = _NUMBER.search(path.stem)
    if match is None:
        raise ValueError(f"mask file {path} has no frame number in its name")
    return int(match.group(1))


def _check_consecutive(folder: Path, files: list[Path]) -> None:
    numbers = [frame_number(p) for p in files]
    seen: dict[int, Path] = {}
    for number, path in zip(numbers, files):
        if number in seen:
            raise ValueError(f"mask folder {folder}: {seen[number].name} and {path.name} are both frame {number}")
        seen[number] = path
    missing = sorted(set(range(min(numbers), max(numbers) + 1)) - set(numbers))
    if missing:
        shown = ", ".join(str(n) for n in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise ValueError(f"mask folder {folder} is missing frame(s) {shown} "
                         f"(frames {min(numbers)}..{max(numbers)} must all be present)")


def _read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; fully transparent pixels read as background."""
    try:
        with Image.open(path) as image:
            image.load()
            rgba = np.asarray(image.convert("RGBA"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"mask file {path} is not a readable image: {err}") from err
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 0
    return rgb


def _check_colours(colours, tolerance: float) -> np.ndarray:
    colours_C3 = np.asarray(colours, dtype=np.float32)
    if colours_C3.shape != (2, 3):
        raise ValueError(f"expected two RGB colours, one per subject, got {colours!r}")
    if np.any(colours_C3 < 0) or np.any(colours_C3 > 255):
        raise ValueError(f"mask colours must be RGB values in 0..255, got {colours!r}")
    for colour in colours_C3:
        if np.linalg.norm(colour) <= tolerance:
            raise ValueError(f"mask colour {tuple(int(c) for c in colour)} is within tolerance {tolerance} of the "
                             "black background")
    if np.array_equal(colours_C3[0], colours_C3[1]):
        raise ValueError(f"the two subjects need different colours, got {colours!r}")
    return colours_C3


def _auto_colours(folder: Path, frames_rgb: list[np.ndarray]) -> np.ndarray:
    """The distinct non-black colours of the clip, in the official loader's subject order (ascending RGB)."""
    codes: set[int] = set()
    for rgb in frames_rgb:
        packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
        codes.update(int(c) for c in np.unique(packed))
        if len(codes) > 3:
            break
    codes.discard(0)
    if len(codes) != 2:
        found = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in sorted(codes)[:8])
        raise ValueError(f"mask folder {folder}: colours='auto' needs exactly two flat non-black colours, found "
                         f"{len(codes) if len(codes) <= 2 else 'more than 2'} ({found}); pass colours= explicitly")
    return np.array([((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in sorted(codes)], dtype=np.float32)


def _masks_from_rgb(rgb_HW3: np.ndarray, colours_C3: np.ndarray, tolerance: float) -> np.ndarray:
    """(2, H, W) {0, 1}: each pixel goes to the nearest subject colour within tolerance, else background."""
    distance_CHW = np.linalg.norm(rgb_HW3[None].astype(np.float32) - colours_C3[:, None, None, :], axis=-1)
    nearest_HW = distance_CHW.argmin(axis=0)
    within_HW = distance_CHW.min(axis=0) <= tolerance
    return np.stack([(nearest_HW == c) & within_HW for c in range(2)]).astype(np.float32)


def load_mask_folder(folder: str | Path, expected_frames: int | None = None,
                     colours=DEFAULT_COLOURS, tolerance: float = 60) -> MaskClip:
    """Read a colour-coded mask folder into (N, 2, H, W) float32 masks in {0, 1}, frames in numeric order.

    `colours`: one RGB colour per subject, matched within `tolerance` (Euclidean RGB distance), or "auto".
    A subject may be empty in some frames (occlusion: listed in `empty_frames` and logged) but not in all.
    """
    folder = Path(folder)
    files = sorted_frame_files(folder, suffixes=(".png",))
    _check_consecutive(folder, files)
    if expected_frames is not None and len(files) != expected_frames:
        raise ValueError(f"mask folder {folder} has {len(files)} frames, expected {expected_frames}")

    frames_rgb = []
    for path in files:
        rgb = _read_rgb(path)
        if frames_rgb and rgb.shape != frames_rgb[0].shape:
            raise ValueError(f"mask file {path} is {rgb.shape[1]}x{rgb.shape[0]}, but {files[0].name} is "
                             f"{frames_rgb[0].shape[1]}x{frames_rgb[0].shape[0]}")
        frames_rgb.append(rgb)

    if isinstance(colours, str):
        if colours != "auto":
            raise ValueError(f"colours must be two RGB triples or 'auto', got {colours!r}")
        colours_C3 = _auto_colours(folder, frames_rgb)
        log.info("mask folder %s: subject colours %s", folder, [tuple(int(v) for v in c) for c in colours_C3])
    else:
        colours_C3 = _check_colours(colours, tolerance)

    masks_N2HW = np.stack([_masks_from_rgb(rgb, colours_C3, tolerance) for rgb in frames_rgb])
    present_N2 = masks_N2HW.any(axis=(2, 3))
    empty_frames = {}
    for s, subject in enumerate(SUBJECTS):
        colour = tuple(int(v) for v in colours_C3[s])
        if not present_N2[:, s].any():
            raise ValueError(f"mask folder {folder}: {subject} (colour {colour}) has an empty mask in every frame")
        empty_frames[subject] = [int(i) for i in np.flatnonzero(~present_N2[:, s])]
        if empty_frames[subject]:
            log.warning("mask folder %s: %s (colour %s) is absent from %d of %d frames: %s", folder, subject,
                        colour, len(empty_frames[subject]), len(files),
                        ", ".join(files[i].name for i in empty_frames[subject]))
    return MaskClip(masks=masks_N2HW, empty_frames=empty_frames, source=folder)


def save_mask_folder(folder: str | Path, masks_N2HW, colours=DEFAULT_COLOURS, front: int | None = None) -> list[Path]:
    """Write (N, 2, H, W) masks (values >= 0.5 count as set) as frame00000.png ... in the colour-coded format.

    A pixel holds one colour, so overlapping subjects need `front` (0 or 1: the subject drawn on top);
    with front=None an overlap is an error. Frames an earlier call wrote to the folder are replaced (so no
    stale frame outlives a shorter clip); any other PNG in the folder is an error.
    """
    folder = Path(folder)
    masks = np.asarray(masks_N2HW)
    if masks.ndim != 4 or masks.shape[1] != 2:
        raise ValueError(f"save_mask_folder expects (N, 2, H, W) masks, got shape {masks.shape}")
    if front not in (None, 0, 1):
        raise ValueError(f"front must be None, 0 or 1, got {front!r}")
    colours_C3 = _check_colours(colours, tolerance=0).astype(np.uint8)
    set_N2HW = masks >= 0.5
    overlap_N = (set_N2HW[:, 0] & set_N2HW[:, 1]).sum(axis=(1, 2))
    if front is None and overlap_N.any():
        i = int(np.flatnonzero(overlap_N)[0])
        raise ValueError(f"frame {i}: the two subject masks overlap in {int(overlap_N[i])} pixels; "
                         "pass front=0 or front=1 to choose the subject drawn on top")
    previous = [p for p in folder.iterdir() if p.suffix.lower() == ".png"] if folder.is_dir() else []
    foreign = [p.name for p in previous if not _SAVED_NAME.fullmatch(p.name)]
    if foreign:
        raise ValueError(f"mask folder {folder} holds other PNG files ({', '.join(sorted(foreign)[:5])}); "
                         "write to an empty folder")
    for path in previous:
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)

    back = 1 if front == 0 else 0
    written = []
    for i, set_2HW in enumerate(set_N2HW):
        rgb_HW3 = np.zeros(set_2HW.shape[1:] + (3,), dtype=np.uint8)
        rgb_HW3[set_2HW[back]] = colours_C3[back]
        rgb_HW3[set_2HW[1 - back]] = colours_C3[1 - back]
        path = folder / f"frame{i:05d}.png"
        Image.fromarray(rgb_HW3).save(path)
        written.append(path)
    return written
