import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dr_train.data.mask_import import load_mask_folder, save_mask_folder
from dr_train.masks import latent_masks

RED, GREEN = (255, 0, 0), (0, 255, 0)


def write_frame(folder, name, boxes_by_colour, size=(24, 16)):
    """A colour-coded mask PNG: boxes_by_colour maps an RGB colour to (x0, y0, x1, y1) or None."""
    width, height = size
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    for colour, box in boxes_by_colour.items():
        if box is not None:
            x0, y0, x1, y1 = box
            rgb[y0:y1, x0:x1] = colour
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / name)


def test_frames_are_read_in_numeric_order(tmp_path):
    numbers = list(range(1, 13))
    random.Random(0).shuffle(numbers)
    for n in numbers:  # subject1's box starts at x = n: the frame number is readable from the mask
        write_frame(tmp_path, f"frame{n}.png", {RED: (n, 0, n + 2, 4), GREEN: (0, 10, 4, 14)})
    clip = load_mask_folder(tmp_path, expected_frames=12)
    assert clip.masks.shape == (12, 2, 16, 24) and clip.masks.dtype == np.float32
    assert set(np.unique(clip.masks)) == {0.0, 1.0}
    first_x = [int(np.flatnonzero(clip.masks[i, 0].any(axis=0))[0]) for i in range(12)]
    assert first_x == list(range(1, 13))
    assert clip.masks[:, 1, 10:14, 0:4].all() and clip.masks[:, 1].sum() == 12 * 16
    assert clip.empty_frames == {"subject1": [], "subject2": []}


def test_colours_match_within_tolerance_and_are_a_parameter(tmp_path):
    write_frame(tmp_path / "a", "frame0.png", {(230, 20, 10): (0, 0, 4, 4), (15, 240, 30): (8, 8, 12, 12),
                                               (128, 0, 0): (16, 0, 20, 4)})  # dark red: an anti-aliased edge
    clip = load_mask_folder(tmp_path / "a")
    assert clip.masks[0, 0].sum() == 16 and clip.masks[0, 0, 0:4, 0:4].all()
    assert clip.masks[0, 1].sum() == 16 and clip.masks[0, 1, 8:12, 8:12].all()
    write_frame(tmp_path / "b", "frame0.png", {(255, 255, 0): (0, 0, 4, 4), (0, 255, 255): (8, 8, 12, 12)})
    clip = load_mask_folder(tmp_path / "b", colours=((0, 255, 255), (255, 255, 0)))
    assert clip.masks[0, 0, 8:12, 8:12].all() and clip.masks[0, 1, 0:4, 0:4].all()


def test_auto_colours_follow_the_official_loader_order(tmp_path):
    # the official loader orders subjects by ascending RGB of the distinct colours: (0,255,0) before (255,0,0)
    write_frame(tmp_path, "frame0.png", {RED: (0, 0, 4, 4), GREEN: (8, 8, 12, 12)})
    write_frame(tmp_path, "frame1.png", {RED: (1, 0, 5, 4), GREEN: None})
    clip = load_mask_folder(tmp_path, colours="auto")
    assert clip.masks[0, 0, 8:12, 8:12].all() and clip.masks[0, 1, 0:4, 0:4].all()
    assert clip.empty_frames == {"subject1": [1], "subject2": []}
    write_frame(tmp_path, "frame2.png", {(0, 0, 255): (0, 0, 4, 4)})
    with pytest.raises(ValueError, match="exactly two"):
        load_mask_folder(tmp_path, colours="auto")


def test_missing_frame_is_an_error_naming_the_number(tmp_path):
    for n in (0, 1, 2, 4, 5, 7):
        write_frame(tmp_path, f"frame{n}.png", {RED: (0, 0, 4, 4), GREEN: (8, 8, 12, 12)})
    with pytest.raises(ValueError, match=r"missing frame\(s\) 3, 6") as err:
        load_mask_folder(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_duplicate_frame_number_is_an_error(tmp_path):
    write_frame(tmp_path, "frame1.png", {RED: (0, 0, 4, 4), GREEN: (8, 8, 12, 12)})
    write_frame(tmp_path, "frame01.png", {RED: (0, 0, 4, 4), GREEN: (8, 8, 12, 12)})
    with pytest.raises(ValueError, match="both frame 1"):
        load_mask_folder(tmp_path)


def test_wrong_frame_count_names_both_numbers(tmp_path):
    for n in range(5):
        write_frame(tmp_path, f"frame{n}.png", {RED: (0, 0, 4, 4), GREEN: (8, 8, 12, 12)})
    with pytest.raises(ValueError, match="has 5 frames, expected 13"):
        load_mask_folder(tmp_path, expected_frames=13)


def test_frame_of_another_size_is_an_error_naming_the_file(tmp_path):
    write_frame(tmp_path, "frame0.png", {RED: (0, 0, 4, 4), GREEN: (8, 8, 12, 12)})
    write_frame(tmp_path, "frame1.png", {RED: (0, 0, 4, 4), GREEN: (8, 8, 12, 12)}, size=(32, 16))
    with pytest.raises(ValueError, match="frame1.png is 32x16"):
        load_mask_folder(tmp_path)


def test_corrupt_png_is_an_error_naming_the_file(tmp_path):
    write_frame(tmp_path, "frame0.png", {RED: (0, 0, 4, 4), GREEN: (8, 8, 12, 12)})
    good = (tmp_path / "frame0.png").read_bytes()
    (tmp_path / "frame1.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="frame1.png"):
        load_mask_folder(tmp_path)
    (tmp_path / "frame1.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="frame1.png is not a readable image"):
        load_mask_folder(tmp_path)


def test_subject_empty_in_every_frame_is_an_error(tmp_path):
    for n in range(3):
        write_frame(tmp_path, f"frame{n}.png", {RED: (0, 0, 4, 4), GREEN: None})
    with pytest.raises(ValueError, match="subject2 .* empty mask in every frame") as err:
        load_mask_folder(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_occluded_frames_are_returned_and_logged(tmp_path, caplog):
    for n in range(6):
        write_frame(tmp_path, f"frame{n}.png", {RED: None if n in (2, 3) else (0, 0, 4, 4),
                                                GREEN: None if n == 5 else (8, 8, 12, 12)})
    with caplog.at_level(logging.WARNING, logger="dr_train.data.mask_import"):
        clip = load_mask_folder(tmp_path)
    assert clip.empty_frames == {"subject1": [2, 3], "subject2": [5]}
    assert clip.masks[2, 0].sum() == 0 and clip.masks[4, 0].sum() == 16
    assert "frame2.png, frame3.png" in caplog.text and "frame5.png" in caplog.text


def test_save_and_load_round_trip_and_overlap_policy(tmp_path):
    g = np.random.default_rng(0)
    masks = np.zeros((7, 2, 16, 24), dtype=np.float32)
    masks[:, 0] = g.random((7, 16, 24)) > 0.6
    masks[:, 1] = (g.random((7, 16, 24)) > 0.6) & (masks[:, 0] == 0)
    paths = save_mask_folder(tmp_path / "clip", masks)
    assert [p.name for p in paths[:2]] == ["frame00000.png", "frame00001.png"]
    assert np.array_equal(load_mask_folder(tmp_path / "clip", expected_frames=7).masks, masks)
    save_mask_folder(tmp_path / "clip", masks[:4])  # re-writing replaces the earlier frames, leaves none stale
    assert np.array_equal(load_mask_folder(tmp_path / "clip", expected_frames=4).masks, masks[:4])
    write_frame(tmp_path / "clip", "mine.png", {RED: (0, 0, 4, 4)})
    with pytest.raises(ValueError, match=r"holds other PNG files \(mine.png\)"):
        save_mask_folder(tmp_path / "clip", masks)

    overlapping = masks.copy()
    overlapping[3, :, 5, 5] = 1
    with pytest.raises(ValueError, match="frame 3: the two subject masks overlap"):
        save_mask_folder(tmp_path / "overlap", overlapping)
    assert not (tmp_path / "overlap").exists()  # refused before writing anything
    save_mask_folder(tmp_path / "front1", overlapping, front=1)
    loaded = load_mask_folder(tmp_path / "front1").masks
    assert loaded[3, 1, 5, 5] == 1 and loaded[3, 0, 5, 5] == 0


def test_imported_masks_pool_to_latent_block_means(tmp_path):
    g = np.random.default_rng(1)
    masks = np.zeros((13, 2, 64, 64), dtype=np.float32)
    masks[:, 0] = g.random((13, 64, 64)) > 0.5
    masks[:, 1] = (g.random((13, 64, 64)) > 0.5) & (masks[:, 0] == 0)
    save_mask_folder(tmp_path, masks, colours=((200, 30, 30), (30, 30, 200)))
    clip = load_mask_folder(tmp_path, expected_frames=13, colours=((200, 30, 30), (30, 30, 200)))
    for s in range(2):
        lat = latent_masks(torch.from_numpy(clip.masks[:, s]))
        assert lat.shape == (3, 8, 8)
        m = masks[:, s]
        expected = np.stack([m[0], m[1:7].mean(0), m[7:13].mean(0)]).reshape(3, 8, 8, 8, 8).mean(axis=(2, 4))
        np.testing.assert_allclose(lat.numpy(), expected, atol=1e-6)
        assert ((lat > 0) & (lat < 1)).any()  # soft block means, not a binarised mask
