import numpy as np
import pytest
import torch
from PIL import Image

from dr_train.data.contact_sheet import GAP, LABEL_HEIGHT, TILE_WIDTH, TITLE_HEIGHT, write_contact_sheet
from dr_train.masks import latent_masks


def two_subject_clip(frames=13, height=64, width=64):
    rgb = np.full((frames, height, width, 3), 128, dtype=np.uint8)
    masks = np.zeros((frames, 2, height, width), dtype=np.float32)
    for f in range(frames):
        masks[f, 0, 16:40, 4 + f:20 + f] = 1
        masks[f, 1, 24:56, 44 - f:60 - f] = 1
    return rgb, masks


def colour_pixels(image, rgb, tolerance=10):
    return int((np.abs(image.astype(int) - rgb).max(axis=-1) <= tolerance).sum())


def test_contact_sheet_shows_both_subjects_and_the_latent_masks(tmp_path):
    frames, masks = two_subject_clip()
    path = write_contact_sheet(tmp_path / "sheets" / "clip.png", frames, masks, title="clip 0", max_frames=5)
    assert path == tmp_path / "sheets" / "clip.png" and path.is_file()
    image = np.asarray(Image.open(path).convert("RGB"))
    height, width = image.shape[:2]
    # 5 frame tiles of 64 px plus gaps; a frame row and one latent row of 64 px tiles plus labels and title
    assert 5 * 64 <= width <= 5 * 64 + 40 and 2 * 64 + 40 <= height <= 2 * 64 + 100
    assert colour_pixels(image, (255, 0, 0)) > 100      # subject1 contour + latent blocks
    assert colour_pixels(image, (0, 0, 255)) > 100      # subject2
    blended_red = (1 - 0.45) * 128 + 0.45 * np.array([255, 0, 0])
    assert colour_pixels(image, blended_red, tolerance=3) > 100  # the frame stays visible under the overlay
    # latent tiles sit in the second row: three latent frames of the 13-frame clip
    latent_row = image[height - GAP - 64:height - GAP]
    assert colour_pixels(latent_row, (255, 0, 0), tolerance=2) > 0


def test_latent_row_matches_given_latent_masks(tmp_path):
    frames, masks = two_subject_clip()
    latents = torch.stack([latent_masks(torch.from_numpy(masks[:, s])) for s in range(2)]).numpy()
    latents[1, 2] = 0.0  # subject2 erased from the last latent frame: its tile must hold no blue
    path = write_contact_sheet(tmp_path / "clip.png", frames, masks, latent_masks_2fhw=latents, max_frames=4)
    image = np.asarray(Image.open(path).convert("RGB"))
    top = TITLE_HEIGHT + (LABEL_HEIGHT + 64 + GAP) + LABEL_HEIGHT  # second row, below its labels
    tiles = [image[top:top + 64, GAP + k * (64 + GAP):GAP + k * (64 + GAP) + 64] for k in range(3)]
    for k in range(3):  # each tile is the latent frame, nearest-upsampled 8x: red = subject1, blue = subject2
        expected = np.repeat(np.repeat(latents[:, k], 8, axis=1), 8, axis=2)
        np.testing.assert_allclose(tiles[k][..., 0] / 255, expected[0], atol=1 / 255)
        np.testing.assert_allclose(tiles[k][..., 2] / 255, expected[1], atol=1 / 255)
        assert tiles[k][..., 1].max() == 0
    assert tiles[0][..., 2].max() == 255 and tiles[2][..., 2].max() == 0


def test_large_frames_are_scaled_and_unusable_latent_shapes_are_reported(tmp_path):
    frames = np.zeros((10, 120, 600, 3), dtype=np.uint8)  # 10 frames: not 1 + 6k, no latent masks
    masks = np.zeros((10, 2, 120, 600), dtype=np.float32)
    masks[:, 0, 10:50, 10:100] = 1
    masks[:, 1, 60:110, 400:500] = 1
    path = write_contact_sheet(tmp_path / "big.png", frames, masks, max_frames=8)
    width, height = Image.open(path).size
    assert width <= 8 * (TILE_WIDTH + 4) + 4 and height < 200


def test_mismatched_inputs_are_errors(tmp_path):
    frames, masks = two_subject_clip()
    with pytest.raises(ValueError, match="to match the frames"):
        write_contact_sheet(tmp_path / "x.png", frames, masks[:5])
    with pytest.raises(ValueError, match="uint8"):
        write_contact_sheet(tmp_path / "x.png", frames.astype(np.float32), masks)
    with pytest.raises(ValueError, match=r"\(2, f, h, w\)"):
        write_contact_sheet(tmp_path / "x.png", frames, masks, latent_masks_2fhw=np.zeros((3, 8, 8)))
