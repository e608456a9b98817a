"""Built-in synthetic relations: short videos of two distinct subjects performing each of the 26 relations.

The main job's default data, so training runs anywhere without downloads. Subject 1 is an ellipse with striped
texture, subject 2 a rectangle with a checker texture, each with a per-clip colour; both have an "arm" (a bar
reaching toward the other subject) whose length and height the pattern drives. Each relation is a distinct
two-body motion pattern given as keyframes of a few parameters over normalised time (approach, contact,
separation, one pushes the other, one follows, hands meet, one falls...). Per clip the pattern is jittered
(position, size, timing, left/right mirroring) and the appearance is random.

A clip carries exact per-frame subject masks (visible pixels; subject 1 in front) and per-frame boxes of each
subject's full shape, so later stages can judge generated videos programmatically against the ground truth.
`write_synthetic_videos` writes clips in the layout `launch/prepare.py` ingests from users: an mp4 per clip,
a colour-coded PNG mask folder beside it, and a JSON file with the ground truth.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dr_train.data.mask_import import save_mask_folder
from dr_train.data.video import write_mp4

# Parameters a pattern drives, with their defaults:
#   x1, x2   body centre x (fraction of width)         y1, y2   body centre y (fraction of height)
#   arm1/2   arm extension, 0 (none) to 1 (full reach)  ah1/2    arm height, in body half-heights from the centre
#                                                                (-1 top of the body, +1 its bottom)
#   h1, h2   body height scale (crouching, ducking)    lie2     subject 2 upright (0) to lying on the ground (1)
DEFAULTS = {"x1": 0.3, "x2": 0.7, "y1": 0.55, "y2": 0.55, "arm1": 0.0, "arm2": 0.0, "ah1": 0.0, "ah2": 0.0,
            "h1": 1.0, "h2": 1.0, "lie2": 0.0}


def _wave(lo: float, hi: float, t0: float, t1: float, cycles: int, end: float | None = None) -> list:
    """Keyframes alternating lo/hi `cycles` times between t0 and t1 (then `end`, default lo)."""
    n = 2 * cycles
    pts = [(t0 + (t1 - t0) * i / n, lo if i % 2 == 0 else hi) for i in range(n + 1)]
    return [(0.0, lo)] + pts + [(1.0, lo if end is None else end)]


# Each relation shows itself in what the bodies do (where they go, bob, jump, lunge), not in the arms alone: the synth
# world's 8x / 6x VAE keeps bodies but loses arm bars a few pixels thick between them, and arm motions whose half-cycle
# is shorter than a latent frame (6 frames). Handshaking, wielding knife, high-five, cheers and drink and rock paper
# scissors were redrawn for that (docs/synth.md, "The relations redrawn at the latent's scale").
PATTERNS: dict[str, dict[str, list | float]] = {
    "punching_slapping": {"x1": 0.38, "x2": [(0, .62), (.2, .62), (.3, .66), (.5, .66), (.6, .70), (1, .70)],
                          "arm1": [(0, 0), (.2, 1), (.3, 0), (.5, 1), (.6, 0), (1, 0)], "ah1": -0.6},
    "kicking": {"x1": [(0, .22), (.3, .36), (1, .36)], "x2": [(0, .62), (.45, .62), (.6, .84), (1, .84)],
                "arm1": [(0, 0), (.3, 0), (.5, 1), (.65, 0), (1, 0)], "ah1": 0.9},
    "pushing": {"x1": [(0, .2), (.4, .4), (1, .62)], "x2": [(0, .6), (.4, .6), (1, .86)],
                "arm1": [(0, 0), (.35, .8), (1, .8)], "ah1": -0.1},
    "patting_on_back": {"x1": 0.45, "x2": 0.6, "arm1": 0.5, "ah1": _wave(-0.9, -0.4, 0.05, 0.95, 4)},
    "pointing_finger": {"x1": 0.18, "x2": 0.82, "arm1": [(0, 0), (.3, 1), (1, 1)], "ah1": -0.5},
    "hugging": {"x1": [(0, .25), (.6, .45), (1, .46)], "x2": [(0, .75), (.6, .55), (1, .54)],
                "arm1": [(0, 0), (.5, 0), (.7, .5), (1, .5)], "arm2": [(0, 0), (.5, 0), (.7, .5), (1, .5)],
                "ah1": -0.3, "ah2": -0.3},
    "giving_something": {"x1": 0.33, "x2": [(0, .67), (.7, .67), (1, .88)],
                         "arm1": [(0, 0), (.3, 1), (.6, 1), (.8, 0), (1, 0)],
                         "arm2": [(0, 0), (.4, 0), (.6, .8), (.9, .8), (1, .3)]},
    "touching_pocket": {"x1": [(0, .08), (.5, .42), (1, .42)], "x2": 0.62,
                        "arm1": [(0, 0), (.4, 0), (.7, .7), (1, .7)], "ah1": 0.4},
    "handshaking": {"x1": [(0, .18), (.35, .32), (1, .32)], "x2": [(0, .82), (.35, .68), (1, .68)],
                    "arm1": [(0, 0), (.35, 0), (.45, 1), (.95, 1), (1, .5)],
                    "arm2": [(0, 0), (.35, 0), (.45, 1), (.95, 1), (1, .5)],
                    "y1": [(0, .55), (.45, .55), (.7, .47), (.95, .57), (1, .55)],
                    "y2": [(0, .55), (.45, .55), (.7, .47), (.95, .57), (1, .55)]},
    "walking_towards": {"x1": [(0, .1), (1, .38)], "x2": [(0, .9), (1, .62)]},
    "walking_apart": {"x1": [(0, .38), (1, .1)], "x2": [(0, .62), (1, .9)]},
    "hitting_with_object": {"x1": [(0, .28), (.3, .4), (1, .4)], "x2": 0.68, "arm1": [(0, 0), (.3, .6), (.6, 1.2), (1, .4)],
                            "ah1": [(0, -.5), (.3, -1.6), (.6, -.2), (1, 0)], "h2": [(0, 1), (.55, 1), (.7, .6), (1, .6)]},
    "wielding_knife": {"x1": [(0, .25), (.25, .4), (.5, .3), (.75, .45), (1, .38)],
                       "x2": [(0, .6), (.25, .66), (.5, .66), (.75, .76), (1, .76)],
                       "arm1": [(0, 0), (.2, 1), (.3, 1), (.5, .2), (.7, 1), (.8, 1), (1, .2)], "ah1": -0.6},
    "knocking_over": {"x1": [(0, .3), (.4, .42), (1, .42)], "x2": [(0, .62), (.4, .62), (1, .7)],
                      "arm1": [(0, 0), (.35, .9), (.55, .9), (.7, 0), (1, 0)], "lie2": [(0, 0), (.45, 0), (.75, 1), (1, 1)]},
    "grabbing_stuff": {"x1": [(0, .36), (.5, .36), (1, .2)], "x2": 0.62, "arm1": [(0, 0), (.3, 1), (.5, 1), (1, .3)],
                       "ah1": 0.2},
    "shooting_with_gun": {"x1": 0.15, "x2": 0.85, "arm1": [(0, 0), (.25, 1), (1, 1)], "ah1": -0.6,
                          "lie2": [(0, 0), (.45, 0), (.7, 1), (1, 1)]},
    "stepping_on_foot": {"x1": [(0, .3), (.4, .42), (1, .42)], "x2": 0.6,
                         "arm1": [(0, 0), (.4, 0), (.55, .7), (1, .7)], "ah1": 1.4,
                         "y2": [(0, .55), (.55, .55), (.65, .3), (.75, .55), (1, .55)]},
    "high_five": {"x1": [(0, .25), (.4, .38), (1, .38)], "x2": [(0, .75), (.4, .62), (1, .62)],
                  "arm1": [(0, 0), (.4, 0), (.6, 1), (.7, 1), (.85, 0), (1, 0)],
                  "arm2": [(0, 0), (.4, 0), (.6, 1), (.7, 1), (.85, 0), (1, 0)],
                  "ah1": [(0, 0), (.4, -.5), (.6, -1), (.85, -1), (1, 0)],
                  "ah2": [(0, 0), (.4, -.5), (.6, -1), (.85, -1), (1, 0)],
                  "y1": [(0, .55), (.45, .55), (.62, .42), (.75, .42), (.9, .55), (1, .55)],
                  "y2": [(0, .55), (.45, .55), (.62, .42), (.75, .42), (.9, .55), (1, .55)]},
    "cheers_and_drink": {"x1": [(0, .3), (.3, .4), (.5, .4), (.7, .3), (1, .3)],
                         "x2": [(0, .7), (.3, .6), (.5, .6), (.7, .7), (1, .7)],
                         "arm1": [(0, 0), (.25, .9), (.5, .9), (.65, .3), (1, .3)],
                         "arm2": [(0, 0), (.25, .9), (.5, .9), (.65, .3), (1, .3)],
                         "ah1": [(0, 0), (.5, -.5), (.7, -1), (1, -1)], "ah2": [(0, 0), (.5, -.5), (.7, -1), (1, -1)],
                         "y1": [(0, .55), (.6, .55), (.8, .5), (1, .5)], "y2": [(0, .55), (.6, .55), (.8, .5), (1, .5)]},
    "carrying_together": {"x1": [(0, .1), (1, .45)], "x2": [(0, .45), (1, .8)], "arm1": 0.8, "arm2": 0.8,
                          "ah1": 0.3, "ah2": 0.3},
    "taking_a_photo": {"x1": [(0, .3), (.5, .2), (1, .2)], "x2": 0.7, "arm1": [(0, 0), (.5, .3), (1, .3)],
                       "ah1": -1.2, "h2": [(0, 1), (.6, 1), (.7, 1.12), (1, 1.12)]},
    "following": {"x1": [(0, .05), (.5, .25), (1, .6)], "x2": [(0, .3), (1, .8)]},
    "whispering": {"x1": [(0, .25), (.5, .47), (1, .47)], "x2": 0.6, "y1": [(0, .55), (.5, .55), (.7, .4), (1, .4)],
                   "h1": [(0, 1), (.5, 1), (.7, .9), (1, .9)]},
    "exchanging_things": {"x1": [(0, .25), (.2, .37), (.8, .37), (1, .25)], "x2": [(0, .75), (.2, .63), (.8, .63), (1, .75)], "arm1": [(0, 0), (.25, 1), (.4, 0), (.6, 1), (.75, 0), (1, 0)],
                          "arm2": [(0, 0), (.25, 1), (.4, 0), (.6, 1), (.75, 0), (1, 0)]},
    "supporting_somebody": {"x1": [(0, .3), (1, .5)], "x2": [(0, .55), (1, .75)], "h2": 0.72, "arm1": 0.6,
                            "ah1": -0.3, "y2": 0.6},
    "rock_paper_scissors": {"x1": .28, "x2": .72, "arm1": [(0, .4), (.6, .4), (.7, .8), (1, .8)],
                            "arm2": [(0, .4), (.6, .4), (.7, .8), (1, .8)],
                            "ah1": [(0, .3), (.17, -1), (.34, .3), (.51, -1), (.6, .3), (1, .3)],
                            "ah2": [(0, .3), (.17, -1), (.34, .3), (.51, -1), (.6, .3), (1, .3)],
                            "y1": [(0, .55), (.17, .49), (.34, .55), (.51, .49), (.6, .55), (1, .55)],
                            "y2": [(0, .55), (.17, .49), (.34, .55), (.51, .49), (.6, .55), (1, .55)]},
}
RELATIONS = tuple(PATTERNS)


@dataclass
class SyntheticClip:
    video_id: str
    relation: str
    frames: np.ndarray        # uint8 (F, H, W, 3)
    masks: np.ndarray         # float32 (F, 2, H, W), exact visible-pixel masks, disjoint
    boxes: np.ndarray         # float32 (F, 2, 4) xyxy pixels of each subject's full shape
    mirrored: bool

    def truth(self) -> dict:
        return {"video_id": self.video_id, "relation": self.relation, "mirrored": self.mirrored,
                "frames": int(self.frames.shape[0]), "height": int(self.frames.shape[1]),
                "width": int(self.frames.shape[2]), "boxes_xyxy": np.round(self.boxes, 2).tolist()}


def patterns_digest() -> str:
    """A digest of every relation's keyframes: part of the synthetic dataset cache's key, so that clips rendered
    before a pattern changed are not reused."""
    return hashlib.sha256(json.dumps(PATTERNS, sort_keys=True).encode()).hexdigest()[:12]


def pattern_for(relation: str) -> dict:
    """The relation's keyframes; a relation outside the built-in 26 gets one of them, chosen by its name."""
    if relation in PATTERNS:
        return PATTERNS[relation]
    digest = int(hashlib.sha256(relation.encode()).hexdigest(), 16)
    return PATTERNS[RELATIONS[digest % len(RELATIONS)]]


def pattern_tracks(pattern: dict, t_T: np.ndarray, defaults: dict | None = None) -> dict[str, np.ndarray]:
    """Each parameter over normalised times t (T,), piecewise linear between keyframes. `defaults` (default
    DEFAULTS) names the parameters and their values where the pattern does not set them."""
    out = {}
    for name, default in (DEFAULTS if defaults is None else defaults).items():
        spec = pattern.get(name, default)
        if isinstance(spec, (int, float)):
            out[name] = np.full_like(t_T, float(spec))
        else:
            ts, vs = zip(*spec)
            out[name] = np.interp(t_T, ts, vs)
    return out


def _rng(relation: str, index: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"synthetic/{relation}/{index}/{seed}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def _colour(hue: float, rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.6, 0.95), rng.uniform(0.75, 1.0)))


def _shapes(p: dict, i: int, H: int, W: int, radius: float, yy, xx):
    """Boolean full-shape masks and xyxy boxes of both subjects in frame i."""
    shapes, boxes = [], []
    for s in (1, 2):
        cx, cy = p[f"x{s}"][i] * W, p[f"y{s}"][i] * H
        rx, ry = radius, 1.6 * radius * p[f"h{s}"][i]
        if s == 2:
            lie = p["lie2"][i]
            rx, ry = rx + lie * (ry - rx) * 1.4, ry - lie * (ry - 0.7 * radius)
            cy = cy + lie * (1.6 * radius - ry)
            body = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        else:
            body = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        other_cx = p[f"x{3 - s}"][i] * W
        direction = 1.0 if other_cx >= cx else -1.0
        reach = p[f"arm{s}"][i] * 1.6 * radius
        arm_y = cy + p[f"ah{s}"][i] * ry
        thick = max(1.0, 0.28 * radius)
        x0 = cx + direction * rx * 0.8
        x1 = x0 + direction * reach
        arm = (reach > 0.5) & (np.abs(yy - arm_y) <= thick) & \
            (xx >= min(x0, x1)) & (xx <= max(x0, x1))
        shape = body | arm
        ys, xs = np.nonzero(shape)
        box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [cx, cy, cx, cy]
        shapes.append(shape)
        boxes.append(box)
    return shapes, np.array(boxes, dtype=np.float32)


def placed_tracks(rng: np.random.Generator, pattern: dict, frames: int,
                  defaults: dict | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """A clip's tracks: the pattern over `frames` time-warped frames, shifted by a small random offset and mirrored
    left-right with probability 1/2 (returned flag). Draws from `rng` in a fixed order: warp, dx, dy, mirror."""
    warp = rng.uniform(0.85, 1.15)
    p = pattern_tracks(pattern, np.linspace(0.0, 1.0, frames) ** warp, defaults)
    dx, dy = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    mirrored = bool(rng.random() < 0.5)
    for s in (1, 2):
        p[f"x{s}"] = p[f"x{s}"] + dx
        p[f"y{s}"] = p[f"y{s}"] + dy
        if mirrored:
            p[f"x{s}"] = 1.0 - p[f"x{s}"]
    return p, mirrored


def render_clip(relation: str, index: int, frames: int = 13, height: int = 64, width: int = 64,
                seed: int = 0) -> SyntheticClip:
    """Deterministic clip `index` of `relation` (the same arguments always give the same pixels)."""
    if frames < 2 or height < 16 or width < 16:
        raise ValueError(f"synthetic clips need >= 2 frames and >= 16x16 pixels, got {frames}x{height}x{width}")
    rng = _rng(relation, index, seed)
    p, mirrored = placed_tracks(rng, pattern_for(relation), frames)
    radius = min(height, width) * rng.uniform(0.09, 0.11)
    hue1 = rng.random()
    c1, c2 = _colour(hue1, rng), _colour(hue1 + rng.uniform(0.33, 0.67), rng)
    bg_a, bg_b = rng.uniform(0.05, 0.35, 3), rng.uniform(0.05, 0.35, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    ramp = (yy / height)[..., None]
    background = (1 - ramp) * bg_a + ramp * bg_b + rng.normal(0, 0.02, (height, width, 3))
    stripes = 0.75 + 0.25 * (np.floor(yy / max(2, radius / 3)) % 2)[..., None]
    checker = 0.75 + 0.25 * ((np.floor(yy / max(2, radius / 2)) + np.floor(xx / max(2, radius / 2))) % 2)[..., None]
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    masks = np.zeros((frames, 2, height, width), dtype=np.float32)
    boxes = np.zeros((frames, 2, 4), dtype=np.float32)
    for i in range(frames):
        (s1, s2), boxes[i] = _shapes(p, i, height, width, radius, yy, xx)
        visible2 = s2 & ~s1
        img = background.copy()
        img[visible2] = (c2 * checker)[visible2]
        img[s1] = (c1 * stripes)[s1]
        video[i] = np.clip(img * 255.0, 0, 255).round().astype(np.uint8)
        masks[i, 0], masks[i, 1] = s1, visible2
    return SyntheticClip(f"{relation}_{index:04d}", relation, video, masks, boxes, mirrored)


def write_synthetic_videos(root: str | Path, relations: list[str], count: int, frames: int, height: int,
                           width: int, fps: float = 30.0, seed: int = 0, render=render_clip) -> Path:
    """Write `count` clips per relation as `<root>/<relation>/<id>.mp4` + `<id>_masks/` + `<id>.json`, each made by
    `render(relation, index, frames, height, width, seed)` (default `render_clip`; the synth world's exemplars for
    the synth preset). Finished clips (their JSON written last) are kept on a re-run."""
    if count < 1:
        raise ValueError(f"synthetic clips per relation must be >= 1, got {count}")
    root = Path(root)
    for relation in relations:
        folder = root / relation
        for index in range(count):
            truth_path = folder / f"{relation}_{index:04d}.json"
            if truth_path.is_file():
                continue
            clip = render(relation, index, frames, height, width, seed)
            name = f"{relation}_{index:04d}"
            write_mp4(clip.frames, folder / f"{name}.mp4", fps=fps)
            save_mask_folder(folder / f"{name}_masks", clip.masks)
            truth_path.write_text(json.dumps(clip.truth()))
    return root
