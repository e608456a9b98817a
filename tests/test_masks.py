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
