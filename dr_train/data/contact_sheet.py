"""A one-PNG contact sheet for checking a clip's subject masks before spending GPU hours on it.

Top row: evenly spaced frames (first and last included) with subject1 overlaid in red and subject2 in blue
(alpha blend plus a solid contour). Bottom row(s): the latent-resolution masks the trainer sees, one tile per
latent frame labelled with the video frames it covers, nearest-upsampled, red = subject1, blue = subject2 (purple
where both).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dr_train.masks import latent_masks

SUBJECT_RGB = ((255, 0, 0), (0, 0, 255))
ALPHA = 0.45
TILE_WIDTH = 256
LABEL_HEIGHT = 18
TITLE_HEIGHT = 24
GAP = 4


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _contour(mask_HW: np.ndarray) -> np.ndarray:
    padded = np.pad(mask_HW, 1, mode="edge")
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask_HW & ~interior


def overlay_tile(frame_HWC: np.ndarray, masks_2HW: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The frame resized to size (width, height) with both subject masks blended in and outlined."""
    tile = np.asarray(Image.fromarray(frame_HWC).resize(size, Image.BILINEAR)).astype(np.float32)
    for s, rgb in enumerate(SUBJECT_RGB):
        mask = np.asarray(Image.fromarray((masks_2HW[s] >= 0.5).astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        tile[mask] = (1 - ALPHA) * tile[mask] + ALPHA * np.asarray(rgb, dtype=np.float32)
        tile[_contour(mask)] = rgb
    return tile.round().clip(0, 255).astype(np.uint8)


def latent_tile(latent_2hw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    rgb_hw3 = np.zeros(latent_2hw.shape[1:] + (3,), dtype=np.float32)
    rgb_hw3[..., 0] = latent_2hw[0]
    rgb_hw3[..., 2] = latent_2hw[1]
    image = Image.fromarray((rgb_hw3.clip(0, 1) * 255).round().astype(np.uint8))
    return np.asarray(image.resize(size, Image.NEAREST))


def _latent_label(k: int, latent_frames: int, frames: int) -> str:
    if latent_frames > 1 and (frames - 1) % (latent_frames - 1) == 0:
        t = (frames - 1) // (latent_frames - 1)
        return f"latent {k}: 0" if k == 0 else f"latent {k}: {t * (k - 1) + 1}-{t * k}"
    return f"latent {k}"


def _paste_label(sheet: Image.Image, xy: tuple[int, int], text: str, width: int, font, fill=(0, 0, 0)) -> None:
    """Text clipped to the tile width, so long labels never run into the next tile."""
    strip = Image.new("RGB", (width, LABEL_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(strip).text((0, 2), text, fill=fill, font=font)
    sheet.paste(strip, xy)


def _latents_or_reason(masks_F2HW: np.ndarray, latent_masks_2fhw) -> tuple[np.ndarray | None, str]:
    if latent_masks_2fhw is not None:
        latents = np.asarray(latent_masks_2fhw, dtype=np.float32)
        if latents.ndim != 4 or latents.shape[0] != 2:
            raise ValueError(f"latent_masks_2fhw must be (2, f, h, w), got shape {latents.shape}")
        return latents, ""
    try:
        masks = torch.from_numpy(np.ascontiguousarray(masks_F2HW, dtype=np.float32))
        latents = torch.stack([latent_masks(masks[:, s]) for s in range(2)])
    except ValueError as err:
        return None, f"latent masks not shown: {err}"
    return latents.numpy(), ""


def write_contact_sheet(png_path, frames_FHWC, masks_F2HW, latent_masks_2fhw=None, title: str = "",
                        max_frames: int = 8, frame_numbers=None, clip_frames: int | None = None) -> Path:
    """Write the contact sheet of a clip to png_path and return that path.

    frames_FHWC: (F, H, W, 3) uint8; masks_F2HW: (F, 2, H, W) pixel masks in [0, 1] for the same frames;
    latent_masks_2fhw: (2, f, h, w) latent masks, computed with Mochi's VAE grouping when None.
    frame_numbers / clip_frames: when the frames are a selection (a shard sample's preview), the clip frame number
    of each and the clip's frame count, for the labels.
    """
    frames = np.asarray(frames_FHWC)
    masks = np.asarray(masks_F2HW, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (F, H, W, 3) uint8 frames, got shape {frames.shape} dtype {frames.dtype}")
    if masks.shape != (frames.shape[0], 2) + frames.shape[1:3]:
        raise ValueError(f"masks must be (F, 2, H, W) = {(frames.shape[0], 2) + frames.shape[1:3]} to match the "
                         f"frames, got {masks.shape}")
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2 to show the first and last frame, got {max_frames}")
    count, height, width = frames.shape[:3]
    tile_w = min(width, TILE_WIDTH)
    tile_h = max(1, round(height * tile_w / width))
    shown = np.unique(np.linspace(0, count - 1, min(max_frames, count)).round().astype(int))
    latents, reason = _latents_or_reason(masks, latent_masks_2fhw)

    columns = max(len(shown), 4)
    latent_count = 0 if latents is None else latents.shape[1]
    latent_rows = -(-latent_count // columns) if latent_count else 1
    cell_h = LABEL_HEIGHT + tile_h + GAP
    sheet_w = columns * (tile_w + GAP) + GAP
    sheet_h = TITLE_HEIGHT + cell_h * (1 + latent_rows)
    sheet = Image.new("RGB", (sheet_w, sheet_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    legend = "subject1 red, subject2 blue; bottom: latent masks (purple: both)"
    draw.text((GAP, 4), f"{title}  [{legend}]" if title else legend, fill=(0, 0, 0), font=_font(14))

    for col, f in enumerate(shown):
        x, y = GAP + col * (tile_w + GAP), TITLE_HEIGHT
        _paste_label(sheet, (x, y), f"frame {f if frame_numbers is None else frame_numbers[f]}", tile_w, font)
        sheet.paste(Image.fromarray(overlay_tile(frames[f], masks[f], (tile_w, tile_h))), (x, y + LABEL_HEIGHT))

    if latents is None:
        draw.text((GAP, TITLE_HEIGHT + cell_h + 2), reason, fill=(160, 0, 0), font=font)
    for k in range(latent_count):
        row, col = divmod(k, columns)
        x, y = GAP + col * (tile_w + GAP), TITLE_HEIGHT + cell_h * (1 + row)
        _paste_label(sheet, (x, y), _latent_label(k, latent_count, clip_frames or count), tile_w, font)
        sheet.paste(Image.fromarray(latent_tile(latents[:, k], (tile_w, tile_h))), (x, y + LABEL_HEIGHT))

    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
