"""Video I/O for the data pipeline: decode, conform to the training clip spec, write mp4s.

Decoding returns every frame as uint8 RGB (N, H, W, 3) whichever backend does it: PyAV on the CPU, or NVIDIA DALI's
GPU video decoder where a CUDA GPU and the nvidia-dali package are present. `plan_conform` then decides once which
source frames (fps resampling + trim window) and which resize + centre crop make the output clip; the same
`ConformPlan` is applied to the frames (`conform_frames`) and to the subject masks (`conform_masks`), so both stay
aligned frame for frame and pixel for pixel.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dr_train.geometry import check_video_size

log = logging.getLogger(__name__)

BACKENDS = ("auto", "pyav", "dali")
TRIMS = ("center", "start")
FALLBACK_FPS = 30.0
_RESIZE_CHUNK = 8            # frames resized at once: bounds the float copy of 1080p sources
_SHORT_FRACTION = 0.05       # decoding may fall this far short of the header's frame count (B-frames, edit lists)
_SHORT_FRAMES = 2            # ... or this many frames, whichever is larger, before the file counts as truncated
_ASPECT_TOLERANCE = 0.02     # masks may come at another resolution than the video, but not another aspect ratio


def _av():
    """PyAV, imported on first use (deferred: it loads FFmpeg, and only reading or writing video files needs it)."""
    import av
    return av


class VideoError(ValueError):
    """A video that cannot be used: missing, not a video, corrupt or truncated, or too short for the spec."""


@dataclass(frozen=True)
class VideoSpec:
    """What a training clip looks like after conforming."""
    frames: int = 61
    height: int = 480
    width: int = 848
    fps: float = 30.0
    trim: str = "center"

    def __post_init__(self):
        check_video_size(self.frames, self.height, self.width, prefix="VideoSpec.")
        if not (math.isfinite(self.fps) and self.fps >= 0):
            raise ValueError(f"VideoSpec.fps must be >= 0 (0 keeps the source rate), got {self.fps!r}")
        if self.trim not in TRIMS:
            raise ValueError(f"VideoSpec.trim must be one of {', '.join(TRIMS)}, got {self.trim!r}")


@dataclass(frozen=True)
class ConformPlan:
    """How source frames map to output frames; applied identically to frames and masks."""
    source_indices: tuple[int, ...]
    resize_hw: tuple[int, int]
    crop_top: int
    crop_left: int
    out_hw: tuple[int, int]
    source_hw: tuple[int, int] | None = None   # frame size the plan was made for; masks must share its aspect ratio


@dataclass
class DecodedVideo:
    frames: np.ndarray   # uint8 (N, H, W, 3) RGB
    fps: float
    path: str


# ---------------------------------------------------------------------------------------------------- planning

def plan_conform(num_frames: int, fps: float, height: int, width: int, spec: VideoSpec,
                 source: str) -> ConformPlan:
    """Pick the output frames (nearest source time at spec.fps, then the trim window) and the cover-resize + crop."""
    if num_frames < 1 or height < 1 or width < 1:
        raise VideoError(f"{source}: empty video ({num_frames} frames of {height}x{width})")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"{source}: source fps must be positive, got {fps!r}")
    out_fps = spec.fps or fps
    indices = _resample_indices(num_frames, fps / out_fps)
    if len(indices) < spec.frames:
        raise VideoError(_too_short_message(num_frames, fps, out_fps, spec.frames, source))
    start = 0 if spec.trim == "start" else (len(indices) - spec.frames) // 2
    resize_hw, crop_top, crop_left = _cover_crop(height, width, spec.height, spec.width)
    return ConformPlan(source_indices=tuple(indices[start:start + spec.frames]), resize_hw=resize_hw,
                       crop_top=crop_top, crop_left=crop_left, out_hw=(spec.height, spec.width),
                       source_hw=(height, width))


def _nearest(x: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(x) + 0.5).astype(np.int64)   # round half up: numpy/Python round half to even


def _resample_indices(num_frames: int, step: float) -> list[int]:
    """Source index of output frame i is round(i * step) (step = source fps / output fps), while it exists."""
    candidates = _nearest(np.arange(int(num_frames / step) + 2) * step)
    return candidates[candidates < num_frames].tolist()


def _too_short_message(num_frames: int, fps: float, out_fps: float, frames: int, source: str) -> str:
    min_frames = int(_nearest((frames - 1) * fps / out_fps)) + 1
    return (f"{source}: has {num_frames} frames ({num_frames / fps:.2f} s at {fps:g} fps); needs {frames} frames "
            f"at {out_fps:g} fps, i.e. at least {min_frames} source frames ({min_frames / fps:.2f} s)")


def _cover_crop(height: int, width: int, out_h: int, out_w: int) -> tuple[tuple[int, int], int, int]:
    """Aspect-preserving resize that covers out_h x out_w, and the top/left of the centred crop."""
    scale = max(out_h / height, out_w / width)
    resize_hw = (max(out_h, round(height * scale)), max(out_w, round(width * scale)))
    return resize_hw, (resize_hw[0] - out_h) // 2, (resize_hw[1] - out_w) // 2


# ---------------------------------------------------------------------------------------------------- conforming

def conform_frames(frames_FHWC: np.ndarray, plan: ConformPlan) -> np.ndarray:
    """uint8 (N, H, W, 3) source frames -> uint8 (F, out_h, out_w, 3) following the plan."""
    frames_NHWC = np.asarray(frames_FHWC)
    if frames_NHWC.ndim != 4 or frames_NHWC.shape[-1] != 3 or frames_NHWC.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames_NHWC.dtype} {frames_NHWC.shape}")
    _check_source(frames_NHWC.shape[0], frames_NHWC.shape[1:3], plan, "frames")
    out_FHWC = np.empty((len(plan.source_indices), *plan.out_hw, 3), np.uint8)
    for start, chunk in _chunks(plan.source_indices):
        x_NCHW = torch.from_numpy(frames_NHWC[chunk]).permute(0, 3, 1, 2).float()
        y_NCHW = _resize_crop(x_NCHW, plan).round().clamp(0, 255).to(torch.uint8)
        out_FHWC[start:start + len(chunk)] = y_NCHW.permute(0, 2, 3, 1).numpy()
    return out_FHWC


def conform_masks(masks: np.ndarray, plan: ConformPlan) -> np.ndarray:
    """(N, K, H, W) bool or [0, 1] float masks -> float32 (F, K, out_h, out_w) in [0, 1], soft at the edges."""
    masks_NKHW = np.asarray(masks)
    if masks_NKHW.ndim != 4:
        raise ValueError(f"masks must be (N, K, H, W), got shape {masks_NKHW.shape}")
    if masks_NKHW.dtype != np.bool_:
        if not np.issubdtype(masks_NKHW.dtype, np.number):
            raise ValueError(f"masks must be bool or float, got {masks_NKHW.dtype}")
        if masks_NKHW.size and not (masks_NKHW.min() >= 0 and masks_NKHW.max() <= 1):
            raise ValueError(f"mask values must lie in [0, 1], got [{masks_NKHW.min()}, {masks_NKHW.max()}]")
    _check_source(masks_NKHW.shape[0], masks_NKHW.shape[2:4], plan, "masks")
    out_FKHW = np.empty((len(plan.source_indices), masks_NKHW.shape[1], *plan.out_hw), np.float32)
    for start, chunk in _chunks(plan.source_indices):
        x_NKHW = torch.from_numpy(masks_NKHW[chunk].astype(np.float32))
        out_FKHW[start:start + len(chunk)] = _resize_crop(x_NKHW, plan).clamp(0, 1).numpy()
    return out_FKHW


def _check_source(num_frames: int, hw: tuple[int, int], plan: ConformPlan, what: str) -> None:
    if max(plan.source_indices) >= num_frames:
        raise ValueError(f"{what} have {num_frames} frames but the plan reads frame {max(plan.source_indices)}")
    if plan.source_hw is not None:
        aspect, planned = hw[1] / hw[0], plan.source_hw[1] / plan.source_hw[0]
        if abs(aspect / planned - 1) > _ASPECT_TOLERANCE:
            raise ValueError(f"{what} are {hw[0]}x{hw[1]} but the plan was made for "
                             f"{plan.source_hw[0]}x{plan.source_hw[1]} frames (another aspect ratio)")


def _chunks(indices: tuple[int, ...]):
    for start in range(0, len(indices), _RESIZE_CHUNK):
        yield start, list(indices[start:start + _RESIZE_CHUNK])


def _resize_crop(x_NCHW: torch.Tensor, plan: ConformPlan) -> torch.Tensor:
    h, w = plan.resize_hw
    if tuple(x_NCHW.shape[-2:]) != (h, w):
        if h <= x_NCHW.shape[-2] and w <= x_NCHW.shape[-1]:
            x_NCHW = F.interpolate(x_NCHW, size=(h, w), mode="area")   # box filter: antialiased, exact averages
        else:
            x_NCHW = F.interpolate(x_NCHW, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    top, left = plan.crop_top, plan.crop_left
    out = x_NCHW[..., top:top + plan.out_hw[0], left:left + plan.out_hw[1]]
    assert tuple(out.shape[-2:]) == plan.out_hw, (out.shape, plan)
    return out


# ---------------------------------------------------------------------------------------------------- decoding

def dali_available() -> bool:
    """DALI's GPU decoder can be used: a CUDA GPU is visible and nvidia-dali imports."""
    if not torch.cuda.is_available():
        return False
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def decode_video(path: str | Path, backend: str = "auto") -> DecodedVideo:
    """Every frame of the file's first video stream as uint8 RGB (N, H, W, 3), and its frame rate."""
    chosen = _choose_backend(backend)
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if not path.is_file():
        raise VideoError(f"{path}: not a file")
    if chosen == "dali":
        fps, expected = _probe(path)
        frames_NHWC = _decode_dali(path)
    else:
        frames_NHWC, fps, expected = _decode_pyav(path)
    _check_complete(path, len(frames_NHWC), expected)
    return DecodedVideo(frames=frames_NHWC, fps=fps, path=str(path))


def read_video(path: str | Path, spec: VideoSpec, backend: str = "auto") -> tuple[np.ndarray, ConformPlan]:
    """Decode and conform: uint8 (spec.frames, spec.height, spec.width, 3) and the plan (reuse it for masks)."""
    video = decode_video(path, backend)
    num_frames, height, width = video.frames.shape[:3]
    plan = plan_conform(num_frames, video.fps, height, width, spec, video.path)
    return conform_frames(video.frames, plan), plan


def _choose_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"video backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "dali" if dali_available() else "pyav"
    if backend == "dali" and not dali_available():
        raise ValueError("video backend 'dali' needs a CUDA GPU and the nvidia-dali package "
                         "(e.g. pip install nvidia-dali-cuda120); use backend='pyav' or 'auto' here")
    return backend


def _open(path: Path):
    try:
        return _av().open(str(path))
    except _av().FFmpegError as e:
        raise VideoError(f"{path}: cannot be opened as a video (not a video, or corrupt/truncated): {e}") from e


def _video_stream(container, path: Path):
    if not container.streams.video:
        raise VideoError(f"{path}: has no video stream")
    return container.streams.video[0]


def _stream_fps(stream, path: Path) -> float:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and rate > 0:
            return float(rate)
    log.warning("%s: the container gives no frame rate; assuming %g fps", path, FALLBACK_FPS)
    return FALLBACK_FPS


def _expected_frames(stream, container, fps: float) -> int | None:
    """The frame count the header promises: its frame count, else duration x rate; None when it says nothing."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return round(float(stream.duration * stream.time_base) * fps)
    if container.duration:
        return round(container.duration / _av().time_base * fps)
    return None


def _probe(path: Path) -> tuple[float, int | None]:
    with _open(path) as container:
        stream = _video_stream(container, path)
        fps = _stream_fps(stream, path)
        return fps, _expected_frames(stream, container, fps)


def _decode_pyav(path: Path) -> tuple[np.ndarray, float, int | None]:
    frames: list[np.ndarray] = []
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        fps = _stream_fps(stream, path)
        expected = _expected_frames(stream, container, fps)
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
        except _av().FFmpegError as e:
            raise VideoError(f"{path}: decoding failed after {len(frames)} frames (corrupt or truncated): "
                             f"{e}") from e
    return _stack(frames, path), fps, expected


def _stack(frames: list[np.ndarray], path: Path) -> np.ndarray:
    if not frames:
        raise VideoError(f"{path}: has a video stream but no decodable frames")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise VideoError(f"{path}: frame size changes mid-stream ({sorted(shapes)})")
    return np.stack(frames)


def _check_complete(path: Path, decoded: int, expected: int | None) -> None:
    """PyAV (and FFmpeg under DALI) decode a truncated file up to the cut without raising: compare with the header."""
    if expected and expected - decoded > max(_SHORT_FRAMES, _SHORT_FRACTION * expected):
        raise VideoError(f"{path}: decoded only {decoded} of the {expected} frames its header promises; "
                         f"the file is truncated or corrupt")


_DALI_LOCK = threading.Lock()
_DALI_PIPES: dict[int, object] = {}


def _dali_pipeline(device_id: int):
    """A built batch-1 pipeline: encoded file bytes (fed per call) -> GPU (NVDEC) decode of every frame."""
    from nvidia.dali import fn, pipeline_def, types  # deferred: nvidia is an optional dependency

    @pipeline_def(batch_size=1, num_threads=2, device_id=device_id, prefetch_queue_depth=1)
    def decode():
        encoded = fn.external_source(name="encoded", device="cpu", dtype=types.UINT8, ndim=1)
        return fn.experimental.decoders.video(encoded, device="mixed")

    pipe = decode()
    pipe.build()
    return pipe


def _decode_dali(path: Path) -> np.ndarray:
    encoded = np.fromfile(path, dtype=np.uint8)
    if not encoded.size:
        raise VideoError(f"{path}: empty file")
    device_id = torch.cuda.current_device()
    with _DALI_LOCK:
        if device_id not in _DALI_PIPES:
            _DALI_PIPES[device_id] = _dali_pipeline(device_id)
        pipe = _DALI_PIPES[device_id]
        try:
            pipe.feed_input("encoded", [encoded])
            (out,) = pipe.run()
            frames_NHWC = np.array(out.as_cpu()[0])
        except RuntimeError as e:
            del _DALI_PIPES[device_id]   # a failed run can leave the pipeline unusable: rebuild on the next call
            raise VideoError(f"{path}: DALI could not decode it (corrupt, truncated or not a video): {e}") from e
    if frames_NHWC.ndim != 4 or frames_NHWC.shape[0] == 0:
        raise VideoError(f"{path}: DALI decoded no frames")
    assert frames_NHWC.shape[-1] == 3 and frames_NHWC.dtype == np.uint8, (frames_NHWC.shape, frames_NHWC.dtype)
    return np.ascontiguousarray(frames_NHWC)


# ---------------------------------------------------------------------------------------------------- writing

def write_mp4(frames_FHWC: np.ndarray, path: str | Path, fps: float = 30) -> Path:
    """uint8 or [0, 1] float frames -> H.264 mp4 through PyAV (libx264 ships in its wheel)."""
    path = Path(path)
    frames = np.asarray(frames_FHWC)
    if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"write_mp4 needs (F, H, W, 3) frames with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    height, width = frames.shape[1:3]
    path.parent.mkdir(parents=True, exist_ok=True)
    with _av().open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            if width % 2 or height % 2:
                frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            for packet in stream.encode(_av().VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
