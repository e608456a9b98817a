"""Mochi's video <-> latent geometry, stated once: the causal VAE encodes 1 + 6k frames into 1 + k latent frames
(frame 0 alone, then each 6 frames together) and compresses 8x in space; the transformer's 2x2 patches then make
pixel sizes multiples of 16. Dependency-free, so that configuration code can import it without torch."""
from __future__ import annotations

TEMPORAL_COMPRESSION = 6           # video frames per latent frame (after the first)
SPATIAL_COMPRESSION = 8            # pixels per latent pixel, each way
PATCH_SIZE = 2                     # the transformer's patch, in latent pixels
SIZE_MULTIPLE = SPATIAL_COMPRESSION * PATCH_SIZE


def is_video_frames(frames) -> bool:
    """A frame count the VAE takes: an int 1 + 6k, k >= 0."""
    return isinstance(frames, int) and frames >= 1 and (frames - 1) % TEMPORAL_COMPRESSION == 0


def latent_frames(frames: int) -> int:
    """Latent frames of a clip of `frames` (1 + 6k) video frames."""
    return 1 + (frames - 1) // TEMPORAL_COMPRESSION


def video_frames(latent_frames: int) -> int:
    """Video frames decoded from `latent_frames` latent frames: 1 + 6 (latent_frames - 1)."""
    return TEMPORAL_COMPRESSION * (latent_frames - 1) + 1


def latent_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the latent of a height x width video."""
    return height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION


def video_size(latent_height: int, latent_width: int) -> tuple[int, int]:
    """(height, width) of the video decoded from a latent_height x latent_width latent."""
    return SPATIAL_COMPRESSION * latent_height, SPATIAL_COMPRESSION * latent_width


def check_frames(frames: int, name: str = "frames") -> None:
    """ValueError `<name> must be 1 + 6k (Mochi's VAE), got <frames>` unless `is_video_frames(frames)`."""
    if not is_video_frames(frames):
        raise ValueError(f"{name} must be 1 + {TEMPORAL_COMPRESSION}k (Mochi's VAE), got {frames!r}")


def check_size(height: int, width: int, names: str = "height and width") -> None:
    """ValueError `<names> must be positive multiples of 16 (VAE 8x, then patch 2), got <height>x<width>` unless
    both are."""
    if not all(isinstance(n, int) and n >= SIZE_MULTIPLE and n % SIZE_MULTIPLE == 0 for n in (height, width)):
        raise ValueError(f"{names} must be positive multiples of {SIZE_MULTIPLE} (VAE {SPATIAL_COMPRESSION}x, then "
                         f"patch {PATCH_SIZE}), got {height!r}x{width!r}")


def check_video_size(frames: int, height: int, width: int, prefix: str = "") -> None:
    """`check_frames` and `check_size` of a clip, the options named `<prefix>frames`, `<prefix>height and
    <prefix>width` (prefix "prepare.", "--", ...)."""
    check_frames(frames, f"{prefix}frames")
    check_size(height, width, f"{prefix}height and {prefix}width")
