"""Video I/O: PyAV decode, fps resampling, trim, resize + centre crop, masks following the same plan, and the
errors a broken or unsuitable file must raise."""
import ast
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dr_train.data import video as video_mod
from dr_train.data.video import (ConformPlan, VideoError, VideoSpec, conform_frames, conform_masks, decode_video,
                                 plan_conform, read_video, write_mp4)

STEP = 4   # brightness per frame index: survives H.264 on flat frames with room to spare
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def index_frames(n: int, height: int = 16, width: int = 32, step: int = STEP) -> np.ndarray:
    """Flat grey frames whose brightness encodes their index."""
    return (np.arange(n, dtype=np.uint8) * step)[:, None, None, None].repeat(height, 1).repeat(width, 2).repeat(3, 3)


def frame_indices(frames_FHWC: np.ndarray, step: int = STEP) -> list[int]:
    return np.rint(frames_FHWC.reshape(len(frames_FHWC), -1).mean(1) / step).astype(int).tolist()


def striped(height: int, width: int, left: int, right: int) -> np.ndarray:
    """Red columns [0, left), green [left, right), blue [right, width)."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:, :left], frame[:, left:right], frame[:, right:] = RED, GREEN, BLUE
    return frame


def noisy_video(path: Path, n: int = 40, fps: int = 30, **options) -> Path:
    """Incompressible frames, so that cutting the file's bytes in half cuts its frames roughly in half too."""
    import av
    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


# ---------------------------------------------------------------------------------------------------- spec

@pytest.mark.parametrize("kwargs", [dict(frames=60), dict(frames=0), dict(frames=62), dict(height=472),
                                    dict(width=850), dict(height=0), dict(fps=-1.0), dict(trim="end")])
def test_spec_rejects_values_mochi_cannot_use(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        VideoSpec(**kwargs)


def test_spec_accepts_1_plus_6k_frames_and_multiples_of_16():
    assert VideoSpec(frames=1, height=16, width=32, fps=0).frames == 1
    assert VideoSpec(frames=13).frames == 13 and VideoSpec().frames == 61


# ---------------------------------------------------------------------------------------------------- decoding

def test_round_trip_keeps_every_frame_in_order(tmp_path):
    path = write_mp4(index_frames(20), tmp_path / "clip.mp4", fps=30)
    video = decode_video(path, backend="pyav")
    assert video.frames.dtype == np.uint8 and video.frames.shape == (20, 16, 32, 3)
    assert video.fps == pytest.approx(30) and video.path == str(path)
    assert frame_indices(video.frames) == list(range(20))


def test_fractional_fps_survives_writing(tmp_path):
    video = decode_video(write_mp4(index_frames(7), tmp_path / "ntsc.mp4", fps=30000 / 1001), backend="pyav")
    assert video.fps == pytest.approx(29.97, abs=0.01)


def test_fps_60_to_30_takes_every_second_frame(tmp_path):
    path = write_mp4(index_frames(30), tmp_path / "sixty.mp4", fps=60)
    frames, plan = read_video(path, VideoSpec(frames=13, height=16, width=32, fps=30, trim="start"), "pyav")
    assert plan.source_indices == tuple(range(0, 26, 2))
    assert frame_indices(frames) == list(range(0, 26, 2))


def test_fps_zero_keeps_the_source_rate_and_center_trim(tmp_path):
    path = write_mp4(index_frames(21), tmp_path / "clip.mp4", fps=24)
    frames, plan = read_video(path, VideoSpec(frames=13, height=16, width=32, fps=0), "pyav")
    assert plan.source_indices == tuple(range(4, 17))
    assert frame_indices(frames) == list(range(4, 17))


@pytest.mark.parametrize("trim, first", [("start", 0), ("center", 19)])
def test_trim_window(trim, first):
    plan = plan_conform(100, 30.0, 480, 848, VideoSpec(trim=trim), "clip.mp4")
    assert plan.source_indices == tuple(range(first, first + 61))


def test_upsampling_fps_repeats_nearest_frames():
    plan = plan_conform(10, 15.0, 16, 16, VideoSpec(frames=7, height=16, width=16, fps=30, trim="start"), "x")
    assert plan.source_indices == (0, 1, 1, 2, 2, 3, 3)


def test_too_few_frames_names_the_file_and_the_shortfall(tmp_path):
    path = write_mp4(index_frames(10), tmp_path / "short.mp4", fps=30)
    with pytest.raises(VideoError) as info:
        read_video(path, VideoSpec(frames=13, height=16, width=32, fps=30), "pyav")
    message = str(info.value)
    assert str(path) in message and "has 10 frames" in message and "needs 13" in message
    with pytest.raises(VideoError, match="at least 25 source frames"):
        plan_conform(24, 60.0, 16, 16, VideoSpec(frames=13, height=16, width=16, fps=30), "clip.mp4")


# ---------------------------------------------------------------------------------------------------- resize + crop

def test_cover_resize_and_centre_crop_of_an_ntu_frame():
    plan = plan_conform(90, 30.0, 1080, 1920, VideoSpec(), "S001C001P001R001A058_rgb.avi")
    assert plan.resize_hw == (480, 853) and (plan.crop_top, plan.crop_left) == (0, 2)
    assert plan.out_hw == (480, 848)
    tall = plan_conform(61, 30.0, 200, 100, VideoSpec(height=64, width=64), "tall.mp4")
    assert tall.resize_hw == (128, 64) and (tall.crop_top, tall.crop_left) == (32, 0)


def test_crop_is_centred_exactly():
    # 64x256 -> area 2x down to 32x128 -> centre 32 columns [48, 80): exactly the green band, no red or blue
    frames = np.stack([striped(64, 256, 96, 160)] * 7)
    plan = plan_conform(7, 30.0, 64, 256, VideoSpec(frames=7, height=32, width=32), "stripes")
    assert (plan.resize_hw, plan.crop_left) == ((32, 128), 48)
    out = conform_frames(frames, plan)
    assert out.shape == (7, 32, 32, 3) and out.dtype == np.uint8
    assert (out == np.array(GREEN, np.uint8)).all()


def test_off_centre_content_shows_up_where_the_crop_says():
    frames = np.stack([striped(64, 256, 100, 160)] * 7)   # the red band reaches 2 output columns into the crop
    out = conform_frames(frames, plan_conform(7, 30.0, 64, 256, VideoSpec(frames=7, height=32, width=32), "x"))
    assert (out[:, :, :2] == np.array(RED, np.uint8)).all() and (out[:, :, 2:] == np.array(GREEN, np.uint8)).all()


def test_downscaling_averages_fine_detail_instead_of_aliasing_it():
    frames = np.zeros((7, 64, 64, 3), np.uint8)
    frames[:, ::4, ::4] = 255                # one lit pixel per 4x4 block: a point-sampling resize misses them all
    out = conform_frames(frames, plan_conform(7, 30.0, 64, 64, VideoSpec(frames=7, height=16, width=16), "dots"))
    assert np.abs(out.astype(int) - 16).max() <= 1     # 255 / 16


def test_read_video_resizes_and_crops_through_the_codec(tmp_path):
    path = write_mp4(np.stack([striped(64, 256, 96, 160)] * 7), tmp_path / "wide.mp4", fps=30)
    frames, plan = read_video(path, VideoSpec(frames=7, height=32, width=32, fps=30), "pyav")
    assert frames.shape == (7, 32, 32, 3)
    assert np.abs(frames.astype(int) - np.array(GREEN)).max() < 40, "the crop kept red or blue columns"


def test_upscaling_a_small_source():
    frames = index_frames(7, height=8, width=8, step=30)
    out = conform_frames(frames, plan_conform(7, 30.0, 8, 8, VideoSpec(frames=7, height=32, width=32), "small"))
    assert out.shape == (7, 32, 32, 3) and frame_indices(out, step=30) == list(range(7))


# ---------------------------------------------------------------------------------------------------- masks

def test_masks_follow_the_frames_plan():
    spec = VideoSpec(frames=7, height=32, width=32, fps=30)
    frames = index_frames(40, height=64, width=256)
    masks = np.zeros((40, 2, 64, 256), bool)
    masks[20, 1, 10:30, 100:140] = True     # subject 2 on source frame 20
    masks[21, 0] = True                     # subject 1 on source frame 21, which 60 -> 30 fps drops
    plan = plan_conform(40, 60.0, 64, 256, spec, "clip")
    out_masks = conform_masks(masks, plan)
    out_frames = conform_frames(frames, plan)
    assert out_masks.dtype == np.float32 and out_masks.shape == (7, 2, 32, 32)
    j = plan.source_indices.index(20)
    assert frame_indices(out_frames)[j] == 20
    # source rows [10, 30) cols [100, 140) -> resized [5, 15) x [50, 70) -> cropped cols [2, 22)
    expected = np.zeros((32, 32), np.float32)
    expected[5:15, 2:22] = 1
    np.testing.assert_array_equal(out_masks[j, 1], expected)
    assert out_masks[:, 0].max() == 0 and np.delete(out_masks[:, 1], j, axis=0).max() == 0


def test_mask_edges_stay_soft():
    masks = np.zeros((7, 1, 64, 64), bool)
    masks[:, 0, :, :33] = True               # the edge falls inside a 2x2 block of the downscale
    out = conform_masks(masks, plan_conform(7, 30.0, 64, 64, VideoSpec(frames=7, height=32, width=32), "m"))
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[0, 0, 0, 15:18], [1.0, 0.5, 0.0])


def test_masks_of_another_aspect_ratio_are_refused():
    plan = plan_conform(7, 30.0, 64, 256, VideoSpec(frames=7, height=32, width=32), "clip")
    conform_masks(np.zeros((7, 1, 32, 128), bool), plan)    # same aspect, half resolution: fine
    with pytest.raises(ValueError, match="aspect"):
        conform_masks(np.zeros((7, 1, 64, 64), bool), plan)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        conform_masks(np.full((7, 1, 64, 256), 2.0, np.float32), plan)


# ---------------------------------------------------------------------------------------------------- broken files

def test_truncated_mp4_names_the_file(tmp_path):
    path = cut_in_half(write_mp4(index_frames(30), tmp_path / "cut.mp4", fps=30))
    with pytest.raises(VideoError) as info:
        decode_video(path, backend="pyav")
    assert str(path) in str(info.value)


def test_truncated_faststart_mp4_fails_while_decoding(tmp_path):
    path = cut_in_half(noisy_video(tmp_path / "fast.mp4", movflags="faststart"))
    with pytest.raises(VideoError, match="fast.mp4"):
        decode_video(path, backend="pyav")


def test_silently_short_decode_is_caught(tmp_path):
    # FFmpeg decodes a truncated AVI up to the cut without any error; only the header's frame count tells
    path = cut_in_half(noisy_video(tmp_path / "cut.avi"))
    with pytest.raises(VideoError, match=r"cut\.avi: decoded only \d+ of the 40 frames"):
        decode_video(path, backend="pyav")


@pytest.mark.parametrize("content, cause", [("this is not a video\n" * 20, "cannot be opened"),
                                            ("", "cannot be opened"), (None, "no such file")])
def test_non_videos_name_the_file(tmp_path, content, cause):
    path = tmp_path / "x.mp4"
    if content is not None:
        path.write_text(content)
    with pytest.raises(VideoError, match=cause) as info:
        read_video(path, VideoSpec(), backend="pyav")
    assert str(path) in str(info.value)


def test_unknown_fps_falls_back_to_30_with_a_warning(caplog):
    stream = SimpleNamespace(average_rate=None, guessed_rate=None)
    with caplog.at_level(logging.WARNING):
        assert video_mod._stream_fps(stream, Path("nofps.avi")) == 30.0
    assert "nofps.avi" in caplog.text and "30" in caplog.text


# ---------------------------------------------------------------------------------------------------- backends

def test_dali_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not video_mod.dali_available()
    path = write_mp4(index_frames(7), tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match="CUDA GPU.*nvidia-dali"):
        decode_video(path, backend="dali")
    assert decode_video(path, backend="auto").frames.shape == (7, 16, 32, 3)   # auto falls back to PyAV
    with pytest.raises(ValueError, match="backend"):
        decode_video(path, backend="opencv")


def test_generate_imports_write_mp4_from_here_without_a_copy():
    # parsed rather than imported: importing generate pulls in diffusers (seconds)
    tree = ast.parse((Path(video_mod.__file__).parents[1] / "generate.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "write_mp4"]
    assert any(isinstance(n, ast.ImportFrom) and n.module == "dr_train.data.video"
               and "write_mp4" in [a.name for a in n.names] for n in ast.walk(tree))


def test_plan_is_a_plain_value():
    plan = ConformPlan(source_indices=(0, 1), resize_hw=(16, 16), crop_top=0, crop_left=0, out_hw=(16, 16))
    out = conform_frames(index_frames(2, 16, 16), plan)      # a plan without source_hw skips the aspect check
    assert out.shape == (2, 16, 16, 3)
