import pytest
import torch

from dr_train.masks import latent_masks, natural_key, sorted_frame_files


def test_latent_masks_follow_vae_grouping():
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(13, 16, 24, generator=g) > 0.5).float()
    lat = latent_masks(m)
    assert lat.shape == (3, 2, 3)
    assert torch.allclose(lat[0, 1, 2], m[0, 8:16, 16:24].mean())            # latent frame 0 <- video frame 0
    assert torch.allclose(lat[1, 0, 0], m[1:7, 0:8, 0:8].mean())              # frames 1..6
    assert torch.allclose(lat[2, 1, 1], m[7:13, 8:16, 8:16].mean())           # frames 7..12
    assert float(lat.min()) >= 0 and float(lat.max()) <= 1


def test_latent_masks_of_paper_resolution():
    assert latent_masks(torch.zeros(61, 480, 848)).shape == (11, 60, 106)


@pytest.mark.parametrize("shape,msg", [((12, 16, 16), "1 \\+ 6k"), ((13, 15, 16), "multiples of 8"),
                                       ((13, 16), "expects")])
def test_latent_masks_reject_bad_shapes(shape, msg):
    with pytest.raises(ValueError, match=msg):
        latent_masks(torch.zeros(shape))


def test_frames_are_ordered_numerically(tmp_path):
    for i in (10, 2, 1, 0, 11, 3):
        (tmp_path / f"frame{i}.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in sorted_frame_files(tmp_path)] == [f"frame{i}.png" for i in (0, 1, 2, 3, 10, 11)]
    assert sorted(["f10", "f2", "f1"], key=natural_key) == ["f1", "f2", "f10"]


def test_missing_or_empty_mask_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sorted_frame_files(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no frames"):
        sorted_frame_files(tmp_path)


def _official_resize_with_mask_preservation(image_BHW, h, w):
    """The official code's mask downscaling, transcribed: nearest resize, then every 1 of the original is set
    at its scaled position."""
    import torch.nn.functional as F

    _, oh, ow = image_BHW.shape
    out = F.interpolate(image_BHW.unsqueeze(1), size=(h, w), mode="nearest").squeeze(1)
    pos = torch.nonzero(image_BHW == 1, as_tuple=False)
    new_x = (pos[:, 2].float() * (w / ow)).floor().long().clamp(0, w - 1)
    new_y = (pos[:, 1].float() * (h / oh)).floor().long().clamp(0, h - 1)
    out[pos[:, 0], new_y, new_x] = 1.0
    return out


def _official_latent_mask(m_FHW, t=6):
    """Frame 0 alone, then the mean of each group of t frames, each frame resized the official way."""
    h, w = m_FHW.shape[1] // 8, m_FHW.shape[2] // 8
    frames = [_official_resize_with_mask_preservation(m_FHW[:1], h, w)[0]]
    for k in range((m_FHW.shape[0] - 1) // t):
        group = m_FHW[1 + k * t: 1 + (k + 1) * t]
        frames.append(torch.stack([_official_resize_with_mask_preservation(f[None], h, w)[0] for f in group]).mean(0))
    return torch.stack(frames)


def test_max_pooling_equals_the_official_mask_downscaling():
    g = torch.Generator().manual_seed(1)
    m = torch.zeros(13, 32, 48)
    m[:, 5:19, 9:30] = 1.0                                   # a body whose edges cut through latent cells
    m[3:9, 25, 41] = 1.0                                     # one pixel alone in its 8x8 cell
    m[(torch.rand(13, 32, 48, generator=g) > 0.97)] = 1.0    # specks
    ours = latent_masks(m, pooling="max")
    assert torch.allclose(ours, _official_latent_mask(m), atol=1e-7)
    assert (ours >= latent_masks(m)).all() and (ours > latent_masks(m)).any()  # max >= mean, strictly at edges


def test_max_pooling_counts_a_touched_cell_whole():
    m = torch.zeros(7, 16, 16)
    m[3:5, 9, 2] = 1.0                                        # one pixel of cell (1, 0), in 2 of frames 1..6
    assert latent_masks(m, pooling="max")[1, 1, 0] == pytest.approx(2 / 6)
    assert latent_masks(m)[1, 1, 0] == pytest.approx(2 / 6 / 64)


def test_unknown_pooling_is_an_error():
    with pytest.raises(ValueError, match="pooling"):
        latent_masks(torch.zeros(7, 8, 8), pooling="median")
