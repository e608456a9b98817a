"""The synth world: two subjects of text-named kinds doing generic motions or one of the 26 relations.

A small, fully synthetic stand-in for the paper's setting. A base model is pretrained on the world's generic corpus
(`corpus_clip`): every kind in every pairing, doing motions that involve no relation. A user then brings relation
exemplars with two `person` subjects (`exemplar_clip`, like NTU clips), trains a relation LoRA on them and asks
for the relation between other kinds ("A dog is shaking hands with an owl.": `eval_prompts`). The judge
(`dr_train.eval.judge`) reads the relation back from the pixels, `dr_train.eval.kinds` the two kinds.

Everything is chunky, so that it survives an 8x spatial VAE and a tiny diffusion model: bodies have a half-width
of about 0.1 x the frame (radius as in `synthetic.render_clip`), arms are bars about 0.6 radius (>= 3 px at
64 px) thick, textures are a single coarse band, belly or cap, or none.

Kinds (`KINDS`) differ first by colour: each has a hue band (centres 45 degrees apart on the hue circle, half-width
18 degrees, so the bands of different kinds never overlap), then by body shape (ellipse, rectangle, rounded
square, triangle, diamond), aspect (height / width), size and texture. Two subjects of different kinds take hues
within 5.4 degrees of their bands' centres (>= 34 degrees apart); two subjects of the SAME kind take the two ends
of its band (31-36 degrees apart), so the judge's hue 2-means still tells them apart. Textures only lighten or darken
(the hue stays), so the hue is the kind's in every pixel of the body.

Motions reuse the relation renderer's parameters (`synthetic.DEFAULTS`: positions, arm reach and height, body
height scale, subject 2 lying), plus `lie1` (subject 1 lying) and `away1` / `away2` (arm on the side away from the
other subject) that only generic motions set; a relation motion is its `synthetic.PATTERNS` keyframes, jittered and
mirrored exactly as `render_clip` does (`mirrored` flags the mirror image, as there). A generic motion
(`GENERIC_MOTIONS`) is a family of random keyframe tracks, drawn per clip, that differs from every relation in
three ways: (1) each subject's tracks are drawn independently of the other's (no coordination in time: nothing
happens *between* the subjects); (2) the subjects keep apart: their bodies never touch (passing_by crosses at
another height) and an arm on the other subject's side is shortened per frame to stay in its own half of the space
between the bodies, so there is never contact; (3) arms point away from the other subject as often as towards it.
Between them they still cover the parameter space: extended arms at every height, crouching, hopping, lying down
and getting up, for both subject slots and thus for every kind. A generic clip of two different kinds starts with
the kind earlier in `KINDS` on the left (mirrored when needed; same-kind pairs keep the random side): a fixed layout
per pair, so that the kinds named tell the model where each goes. With a random side, the best guess at high noise
is the two kinds' colours blended on both sides, and a small base then draws the blend: a dog (60 degrees) and a
bear (330 degrees) came out as two persons (15 degrees), the mean of their hues.

Captions: a relation's is the catalog's training prompt with the two `person`s replaced by the kinds ("A dog is
shaking hands with an owl."); a generic motion's names both kinds and the motion ("A dog and a cat are
drifting around.") with no word of any relation's phrase. `python -m dr_train.data.world` writes the world's
relation catalog (`datasets/synth_relations.yaml`: the person prompts, and eval prompts naming non-person kinds).
"""
from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from dr_train.catalog import DEFAULT_CATALOG, SYNTH_CATALOG, load_catalog
from dr_train.data.synthetic import DEFAULTS, PATTERNS, RELATIONS, placed_tracks

WORLD_DEFAULTS = {**DEFAULTS, "lie1": 0.0, "away1": 0.0, "away2": 0.0}
_ARM_THICKNESS = 0.3          # half-thickness of an arm bar, in clip radii (synthetic: 0.28)
_ARM_LENGTH = 1.6             # full reach beyond the body, in clip radii (as synthetic)
_RADIUS = (0.095, 0.105)      # clip radius range, fractions of min(H, W)
_GENERIC_MARGIN = 0.05        # generic motions: fraction of the frame between the two bodies at their closest
_KEEP_APART = 0.5             # generic motions: two arms pointing at each other stop this many radii apart
_SAME_KIND_OFFSET = (0.85, 1.0)  # same-kind pair: |hue offset| in band half-widths, on opposite sides
_MIXED_KIND_OFFSET = 0.3      # different kinds: |hue offset| <= this many band half-widths


@dataclass(frozen=True)
class Look:
    """How a kind looks: hue band (degrees), saturation and value ranges (HSV), body shape and size.

    Hues are angles of the opponent colour axes (R - (G+B)/2, sqrt(3)/2 (G-B)), the hue the judge measures: 0 red,
    60 yellow, 120 green, 180 cyan, 240 blue, 300 magenta, like HSV's at these six and within 2 degrees between,
    but uniform where HSV's is not (HSV compresses around yellow and blue by up to 10 %)."""
    hue: float                       # centre of the hue band, degrees (opponent-axis angle)
    hue_width: float                 # half-width of the band, degrees
    saturation: tuple[float, float]
    value: tuple[float, float]
    shape: str                       # ellipse | rectangle | rounded | triangle | diamond
    aspect: float                    # body height / body width
    scale: float                     # body half-width in clip radii
    texture: str = "none"            # none | band (dark middle) | belly (light lower half) | cap (dark top)


KINDS: dict[str, Look] = {
    "person": Look(15.0, 18.0, (0.55, 0.75), (0.85, 1.00), "ellipse", 1.60, 1.00),
    "dog": Look(60.0, 18.0, (0.65, 0.90), (0.80, 1.00), "ellipse", 0.80, 1.20, "cap"),
    "frog": Look(105.0, 18.0, (0.65, 0.90), (0.75, 0.95), "rounded", 0.75, 1.15, "belly"),
    "owl": Look(150.0, 18.0, (0.60, 0.85), (0.75, 0.95), "diamond", 1.35, 1.20),
    "penguin": Look(195.0, 18.0, (0.65, 0.90), (0.80, 1.00), "ellipse", 2.00, 0.85, "belly"),
    "robot": Look(240.0, 18.0, (0.50, 0.70), (0.80, 1.00), "rectangle", 1.50, 0.95, "band"),
    "cat": Look(285.0, 18.0, (0.55, 0.80), (0.80, 1.00), "triangle", 1.45, 1.15),
    "bear": Look(330.0, 18.0, (0.60, 0.85), (0.75, 0.95), "rounded", 1.25, 1.20, "band"),
}

# Body shapes on normalised coordinates u = dx / rx, v = dy / ry (v grows downwards): inside where True.
SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "ellipse": lambda u, v: u ** 2 + v ** 2 <= 1.0,
    "rectangle": lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0),
    "rounded": lambda u, v: u ** 4 + v ** 4 <= 1.0,
    "triangle": lambda u, v: (np.abs(u) <= (v + 1.0) / 2.0) & (np.abs(v) <= 1.0),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
}


# ------------------------------------------------------------------------------------------ generic motions

def _knots(rng: np.random.Generator, lo: float, hi: float, n: int) -> list:
    """n random values in [lo, hi] at evenly spaced times 0..1 (a slow random walk)."""
    return [(float(t), float(rng.uniform(lo, hi))) for t in np.linspace(0.0, 1.0, n)]


def _sway(rng: np.random.Generator, centre: float, amplitude: float, n: int = 4) -> list:
    return _knots(rng, centre - amplitude, centre + amplitude, n)


def _window(rng: np.random.Generator, rest: float, peak: float, back: bool = True) -> list:
    """`rest`, moving to `peak` at a random time (and back to `rest` later when `back`)."""
    t0 = rng.uniform(0.0, 0.45)
    t1 = t0 + rng.uniform(0.1, 0.2)
    if not back:
        return [(0.0, rest), (t0, rest), (t1, peak), (1.0, peak)]
    t2 = rng.uniform(t1 + 0.1, 0.9)
    return [(0.0, rest), (t0, rest), (t1, peak), (t2, peak), (min(1.0, t2 + rng.uniform(0.1, 0.2)), rest),
            (1.0, rest)]


def _oscillate(rng: np.random.Generator, lo: float, hi: float, cycles: int) -> list:
    """lo/hi alternating `cycles` times over a random stretch of the clip."""
    t0 = rng.uniform(0.0, 0.3)
    t1 = rng.uniform(0.7, 1.0)
    n = 2 * cycles
    return [(0.0, lo)] + [(t0 + (t1 - t0) * i / n, lo if i % 2 == 0 else hi) for i in range(n + 1)] + [(1.0, lo)]


def _min_gap(looks: list[Look], lying: bool = False, height: float = 1.0) -> float:
    """Centre distance (fraction of the frame's shorter side; frames are square by default) at which the two bodies,
    at their widest (lying too when `lying`) and at the largest radius, are still `_GENERIC_MARGIN` apart."""
    widest = [max(_body_size(look, _RADIUS[1], height, lie)[0] for lie in ((0.0, 1.0) if lying else (0.0,)))
              for look in looks]
    return sum(widest) + _GENERIC_MARGIN


def _half_height(look: Look) -> float:
    return _body_size(look, _RADIUS[1], 1.0, 0.0)[1]


def _homes(rng: np.random.Generator, min_gap: float) -> dict:
    """Standing places: subject 1 left of subject 2 (the clip may be mirrored), centres `min_gap` to 0.7 of the
    width apart, anywhere between 0.08 and 0.92; heights independent."""
    gap = min_gap + max(0.0, 0.7 - min_gap) * rng.random() ** 2
    centre = rng.uniform(0.08 + gap / 2, max(0.08 + gap / 2, 0.92 - gap / 2))
    return {"x1": centre - gap / 2, "x2": centre + gap / 2,
            "y1": rng.uniform(0.45, 0.65), "y2": rng.uniform(0.45, 0.65)}


def _both_or_one(rng: np.random.Generator) -> tuple[bool, bool]:
    """Which subjects act: each with probability 2/3, at least one."""
    acts = rng.random(2) < 2 / 3
    if not acts.any():
        acts[rng.integers(2)] = True
    return bool(acts[0]), bool(acts[1])


# Generators: (rng, looks of subjects 1 and 2) -> keyframes. `_min_gap` is the centre distance (fraction of the
# width) at which the two bodies, upright or lying as the motion needs, are still a margin apart.

def _idle(rng: np.random.Generator, looks: list[Look]) -> dict:
    home = _homes(rng, _min_gap(looks) + 0.03)
    return {"x1": _sway(rng, home["x1"], 0.015), "x2": _sway(rng, home["x2"], 0.015), "y1": home["y1"],
            "y2": home["y2"], "h1": _knots(rng, 0.95, 1.0, 3), "h2": _knots(rng, 0.95, 1.0, 3)}


def _drifting(rng: np.random.Generator, looks: list[Look]) -> dict:
    """Both wander on their own, each within its side of the frame."""
    inner = 0.5 - _min_gap(looks) / 2
    return {"x1": _knots(rng, 0.08, inner, 3), "x2": _knots(rng, 1.0 - inner, 0.92, 3),
            "y1": _knots(rng, 0.4, 0.7, 3), "y2": _knots(rng, 0.4, 0.7, 3)}


def _bouncing(rng: np.random.Generator, looks: list[Look]) -> dict:
    home = _homes(rng, _min_gap(looks) + 0.06)
    out = {"x1": _sway(rng, home["x1"], 0.03, 3), "x2": _sway(rng, home["x2"], 0.03, 3)}
    for s, acts in zip((1, 2), _both_or_one(rng)):
        base = rng.uniform(0.55, 0.68)
        if acts:
            cycles = int(rng.integers(2, 5))
            out[f"y{s}"] = _oscillate(rng, base, base - rng.uniform(0.1, 0.2), cycles)
            out[f"h{s}"] = _oscillate(rng, 0.85, 1.05, cycles)
        else:
            out[f"y{s}"] = base
    return out


def _passing_by(rng: np.random.Generator, looks: list[Look]) -> dict:
    """One subject crosses the whole frame high up (farther away); the other stands lower, nearer, below it."""
    walker = int(rng.integers(1, 3))
    other = 3 - walker
    start, end = rng.uniform(0.02, 0.12), rng.uniform(0.88, 0.98)
    if rng.random() < 0.5:
        start, end = 1.0 - start, 1.0 - end
    high = rng.uniform(0.22, 0.3)
    low = high + sum(_half_height(look) for look in looks) + _GENERIC_MARGIN + rng.uniform(0.0, 0.05)
    return {f"x{walker}": [(0.0, start), (1.0, end)], f"y{walker}": high,
            f"x{other}": _sway(rng, rng.uniform(0.3, 0.7), 0.02), f"y{other}": low,
            f"h{walker}": _oscillate(rng, 1.0, 0.93, int(rng.integers(3, 6)))}


def _waving(rng: np.random.Generator, looks: list[Look]) -> dict:
    home = _homes(rng, _min_gap(looks) + 0.02)
    out = {"x1": _sway(rng, home["x1"], 0.01), "x2": _sway(rng, home["x2"], 0.01), "y1": home["y1"],
           "y2": home["y2"]}
    for s, acts in zip((1, 2), _both_or_one(rng)):
        if acts:
            out[f"arm{s}"] = _window(rng, 0.0, rng.uniform(0.6, 1.0))
            out[f"ah{s}"] = _oscillate(rng, rng.uniform(-1.8, -1.4), rng.uniform(-1.0, -0.6), int(rng.integers(2, 5)))
            out[f"away{s}"] = float(rng.random() < 0.5)
    return out


def _crouching(rng: np.random.Generator, looks: list[Look]) -> dict:
    out = _homes(rng, _min_gap(looks))
    for s, acts in zip((1, 2), _both_or_one(rng)):
        if acts:
            out[f"h{s}"] = _window(rng, 1.0, rng.uniform(0.55, 0.75), back=bool(rng.random() < 0.7))
    return out


def _lying_down(rng: np.random.Generator, looks: list[Look]) -> dict:
    """Subjects lie down or get up, each on its own."""
    out = _homes(rng, _min_gap(looks, lying=True))
    for s, acts in zip((1, 2), _both_or_one(rng)):
        if acts:
            lie = _window(rng, 0.0, 1.0, back=False)
            out[f"lie{s}"] = lie if rng.random() < 0.6 else [(t, 1.0 - v) for t, v in lie]
    return out


def _stretching(rng: np.random.Generator, looks: list[Look]) -> dict:
    home = _homes(rng, _min_gap(looks, height=1.12))
    out = {"x1": home["x1"], "x2": home["x2"], "y1": home["y1"], "y2": home["y2"]}
    for s in (1, 2):
        out[f"arm{s}"] = _knots(rng, 0.0, 1.2, 4)
        out[f"ah{s}"] = _knots(rng, -1.8, 1.4, 4)
        out[f"h{s}"] = _knots(rng, 0.88, 1.12, 3)
        out[f"away{s}"] = float(rng.random() < 0.5)
    return out


# name -> (keyframe generator, caption phrase)
GENERIC_MOTIONS: dict[str, tuple[Callable[[np.random.Generator, list], dict], str]] = {
    "idle": (_idle, "standing still"),
    "drifting": (_drifting, "drifting around"),
    "bouncing": (_bouncing, "bouncing"),
    "passing_by": (_passing_by, "passing by"),
    "waving": (_waving, "waving"),
    "crouching": (_crouching, "crouching"),
    "lying_down": (_lying_down, "lying down"),
    "stretching": (_stretching, "stretching"),
}
MOTIONS = tuple(RELATIONS) + tuple(GENERIC_MOTIONS)


# ------------------------------------------------------------------------------------------ captions

def _check_motion(motion: str) -> None:
    if motion not in PATTERNS and motion not in GENERIC_MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; the world has the 26 relations of synthetic.PATTERNS and the "
                         f"generic motions {', '.join(GENERIC_MOTIONS)}")


def _check_kinds(kinds) -> tuple[str, str]:
    kinds = tuple(kinds)
    if len(kinds) != 2:
        raise ValueError(f"kinds must name two subjects, got {kinds!r}")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; the world's kinds are {', '.join(KINDS)}")
    return kinds


def with_article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


_KIND_WORD = re.compile(r"[a-z]+")


def kinds_in(prompt: str) -> tuple[str, str] | None:
    """The two kinds a prompt names, in order ("A dog is hugging an owl." -> ('dog', 'owl')); None unless it names
    exactly two (a custom prompt may name none or one)."""
    found = [w for w in _KIND_WORD.findall(prompt.lower()) if w in KINDS]
    return (found[0], found[1]) if len(found) == 2 else None


@functools.lru_cache(maxsize=1)
def _training_prompts() -> dict[str, str]:
    return {name: relation.prompt for name, relation in load_catalog(DEFAULT_CATALOG).items()}


_PERSON = re.compile(r"\b[Aa] person\b")


def caption(motion: str, kinds: tuple[str, str]) -> str:
    """The clip's text: a relation's training prompt with the kinds in place of the two persons, or for a generic
    motion 'A <kind 1> and a <kind 2> are <motion phrase>.'"""
    _check_motion(motion)
    kinds = _check_kinds(kinds)
    if motion in GENERIC_MOTIONS:
        first, second = with_article(kinds[0]), with_article(kinds[1])
        return f"{first[0].upper()}{first[1:]} and {second} are {GENERIC_MOTIONS[motion][1]}."
    prompt = _training_prompts()[motion]
    if len(_PERSON.findall(prompt)) != 2:
        raise ValueError(f"the catalog prompt of {motion!r} must name 'a person' twice, got {prompt!r}")
    names = iter(kinds)

    def swap(match: re.Match) -> str:
        phrase = with_article(next(names))
        return phrase[0].upper() + phrase[1:] if match.group(0)[0] == "A" else phrase
    return _PERSON.sub(swap, prompt)


def eval_kinds(relation: str) -> list[tuple[str, str]]:
    """The 10 evaluation kind pairs of a relation: ordered pairs of two different non-person kinds, a window of a
    sequence in which every 7 consecutive pairs use each kind once in each slot; windows move per relation."""
    if relation not in PATTERNS:
        raise ValueError(f"unknown relation {relation!r}; the world's relations are synthetic.PATTERNS")
    others = [k for k in KINDS if k != "person"]
    n = len(others)
    sequence = [(others[a], others[(a + d) % n]) for d in range(1, n) for a in range(n)]
    start = 10 * RELATIONS.index(relation)
    return [sequence[(start + i) % len(sequence)] for i in range(10)]


def eval_prompts(relation: str) -> list[str]:
    """The 10 evaluation prompts of a relation (pairs of `eval_kinds`), which the exemplars never show."""
    return [caption(relation, kinds) for kinds in eval_kinds(relation)]


# ------------------------------------------------------------------------------------------ rendering

@dataclass
class WorldClip:
    video_id: str
    motion: str               # a relation of synthetic.PATTERNS or a generic motion
    kinds: tuple[str, str]    # subject 1 (in front; the relation's actor), subject 2
    caption: str
    frames: np.ndarray        # uint8 (F, H, W, 3)
    masks: np.ndarray         # float32 (F, 2, H, W), exact visible-pixel masks, disjoint
    boxes: np.ndarray         # float32 (F, 2, 4) xyxy pixels of each subject's full shape
    mirrored: bool

    @property
    def relation(self) -> str | None:
        return self.motion if self.motion in PATTERNS else None

    def truth(self) -> dict:
        return {"video_id": self.video_id, "relation": self.relation, "motion": self.motion,
                "kinds": list(self.kinds), "caption": self.caption, "mirrored": self.mirrored,
                "frames": int(self.frames.shape[0]), "height": int(self.frames.shape[1]),
                "width": int(self.frames.shape[2]), "boxes_xyxy": np.round(self.boxes, 2).tolist()}


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.sha256("/".join(["world", *map(str, parts)]).encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def subject_hues(kinds: tuple[str, str], rng: np.random.Generator) -> list[float]:
    """The two subjects' hues (degrees): near their bands' centres, or the band's two ends for a same-kind pair."""
    looks = [KINDS[k] for k in kinds]
    if kinds[0] == kinds[1]:
        sign = 1.0 if rng.random() < 0.5 else -1.0
        lo, hi = _SAME_KIND_OFFSET
        return [looks[0].hue + sign * rng.uniform(lo, hi) * looks[0].hue_width,
                looks[1].hue - sign * rng.uniform(lo, hi) * looks[1].hue_width]
    return [look.hue + rng.uniform(-_MIXED_KIND_OFFSET, _MIXED_KIND_OFFSET) * look.hue_width for look in looks]


def _opponent_to_hsv_table() -> tuple[np.ndarray, np.ndarray]:
    hsv_H = np.linspace(0.0, 1.0, 3601)
    rgb = np.array([colorsys.hsv_to_rgb(h % 1.0, 1.0, 1.0) for h in hsv_H])
    angle = np.arctan2(0.8660254 * (rgb[:, 1] - rgb[:, 2]), rgb[:, 0] - 0.5 * (rgb[:, 1] + rgb[:, 2]))
    return np.degrees(np.unwrap(angle)), hsv_H


_OPPONENT_DEG, _HSV_HUE = _opponent_to_hsv_table()


def hsv_hue(opponent_deg: float) -> float:
    """HSV hue (0..1) of the colours whose opponent-axis hue angle is `opponent_deg` (independent of S and V)."""
    return float(np.interp(opponent_deg % 360.0, _OPPONENT_DEG, _HSV_HUE))


def _colour(look: Look, hue: float, rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hsv_hue(hue), rng.uniform(*look.saturation), rng.uniform(*look.value)))


def _texture(look: Look, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value factor, white mix) per pixel in body coordinates; both leave the hue unchanged."""
    shade, white = np.ones_like(u), np.zeros_like(u)
    if look.texture == "band":
        shade = np.where(np.abs(v) <= 0.3, 0.6, 1.0)
    elif look.texture == "cap":
        shade = np.where(v <= -0.35, 0.55, 1.0)
    elif look.texture == "belly":
        white = np.where((v >= 0.1) & (np.abs(u) <= 0.75), 0.45, 0.0)
    return shade, white


def _body_size(look: Look, radius: float, h: float, lie: float) -> tuple[float, float, float]:
    """(half-width, half-height, drop of the centre). Crouching scales the height about the centre; lying
    flattens the body to wide and low (wider by 1.4 x |height - width|, as low as 0.7 x its smaller half-side),
    resting on the ground it stood on. For the person, while taller than wide, both are synthetic's subject 2's."""
    rx = radius * look.scale
    upright = rx * look.aspect
    ry = upright * h
    new_rx = rx + lie * 1.4 * abs(ry - rx)
    new_ry = ry - lie * (ry - 0.7 * min(rx, upright))
    return new_rx, new_ry, lie * (upright - new_ry)


def _subjects(p: dict, i: int, looks: list[Look], radius: float, keep_apart: bool, yy, xx):
    """Full-shape masks, (value factor, white mix) textures and xyxy boxes of both subjects in frame i."""
    h, w = xx.shape
    geometry = []
    for s, look in zip((1, 2), looks):
        rx, ry, drop = _body_size(look, radius, p[f"h{s}"][i], p[f"lie{s}"][i])
        geometry.append((p[f"x{s}"][i] * w, p[f"y{s}"][i] * h + drop, rx, ry))
    shapes, textures, boxes = [], [], []
    for s, look in zip((1, 2), looks):
        cx, cy, rx, ry = geometry[s - 1]
        ox, _, orx, _ = geometry[2 - s]
        u, v = (xx - cx) / rx, (yy - cy) / ry
        body = SHAPES[look.shape](u, v)
        towards = 1.0 if ox >= cx else -1.0
        away = p[f"away{s}"][i] > 0.5
        direction = -towards if away else towards
        reach = p[f"arm{s}"][i] * _ARM_LENGTH * radius
        if keep_apart and not away:         # the tip stays in this subject's half of the space between the bodies
            free = abs(ox - cx) - rx - orx - _KEEP_APART * radius
            reach = min(reach, max(0.0, 0.2 * rx + free / 2))
        arm_y = cy + p[f"ah{s}"][i] * ry
        tip = cx + direction * (0.8 * rx + reach)
        arm = (reach > 0.5) & (np.abs(yy - arm_y) <= max(1.5, _ARM_THICKNESS * radius)) & \
            (xx >= min(cx, tip)) & (xx <= max(cx, tip))
        shape = body | arm
        ys, xs = np.nonzero(shape)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [cx, cy, cx, cy])
        shade, white = _texture(look, u, v)
        textures.append((np.where(body, shade, 1.0), np.where(body, white, 0.0)))
        shapes.append(shape)
    return shapes, textures, np.array(boxes, dtype=np.float32)


def _first_on_left(kinds: tuple[str, str]) -> bool:
    """Whether a generic clip of two different `kinds` starts with subject 1 on the left: the kind earlier in KINDS
    is on the left."""
    order = list(KINDS)
    return order.index(kinds[0]) < order.index(kinds[1])


def render_world_clip(motion: str, kinds: tuple[str, str], index: int, frames: int = 25, height: int = 64,
                      width: int = 64, seed: int = 0) -> WorldClip:
    """Deterministic clip `index` of `motion` with subjects of `kinds` (subject 1 in front, the relation's actor)."""
    _check_motion(motion)
    kinds = _check_kinds(kinds)
    if frames < 2 or height < 16 or width < 16:
        raise ValueError(f"world clips need >= 2 frames and >= 16x16 pixels, got {frames}x{height}x{width}")
    rng = _rng(motion, *kinds, index, seed)
    generic = motion in GENERIC_MOTIONS
    looks = [KINDS[k] for k in kinds]
    pattern = GENERIC_MOTIONS[motion][0](rng, looks) if generic else PATTERNS[motion]
    p, mirrored = placed_tracks(rng, pattern, frames, WORLD_DEFAULTS)
    if generic and kinds[0] != kinds[1] and (p["x1"][0] <= p["x2"][0]) != _first_on_left(kinds):
        p = {**p, "x1": 1.0 - p["x1"], "x2": 1.0 - p["x2"]}
        mirrored = not mirrored
    radius = min(height, width) * rng.uniform(*_RADIUS)
    colours = [_colour(look, hue, rng) for look, hue in zip(looks, subject_hues(kinds, rng))]
    bg_a, bg_b = rng.uniform(0.05, 0.35, 3), rng.uniform(0.05, 0.35, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    ramp = (yy / height)[..., None]
    background = (1 - ramp) * bg_a + ramp * bg_b + rng.normal(0, 0.02, (height, width, 3))
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    masks = np.zeros((frames, 2, height, width), dtype=np.float32)
    boxes = np.zeros((frames, 2, 4), dtype=np.float32)
    for i in range(frames):
        (s1, s2), textures, boxes[i] = _subjects(p, i, looks, radius, generic, yy, xx)
        visible2 = s2 & ~s1
        img = background.copy()
        for shape, colour, (shade, white) in ((visible2, colours[1], textures[1]), (s1, colours[0], textures[0])):
            paint = colour * shade[..., None]
            paint = paint + white[..., None] * (1.0 - paint)
            img[shape] = paint[shape]
        video[i] = np.clip(img * 255.0, 0, 255).round().astype(np.uint8)
        masks[i, 0], masks[i, 1] = s1, visible2
    video_id = f"{motion}__{kinds[0]}_{kinds[1]}_{index:05d}"
    return WorldClip(video_id, motion, kinds, caption(motion, kinds), video, masks, boxes, mirrored)


# ------------------------------------------------------------------------------------------ corpora

def corpus_spec(index: int, seed: int = 0) -> tuple[str, tuple[str, str]]:
    """(generic motion, (kind 1, kind 2)) of pretraining clip `index`. Every block of len(GENERIC_MOTIONS) x
    len(KINDS)^2 consecutive indices holds each combination (same-kind pairs included) exactly once, in a seeded
    random order, so the corpus is uniform over motions, kinds and pairs."""
    if index < 0:
        raise ValueError(f"corpus index must be >= 0, got {index}")
    motions, kinds = list(GENERIC_MOTIONS), list(KINDS)
    block = len(motions) * len(kinds) ** 2
    cell = int(_rng("corpus", index // block, seed).permutation(block)[index % block])
    motion, rest = motions[cell // len(kinds) ** 2], cell % len(kinds) ** 2
    return motion, (kinds[rest // len(kinds)], kinds[rest % len(kinds)])


def corpus_clip(index: int, seed: int = 0, frames: int = 25, height: int = 64, width: int = 64) -> WorldClip:
    """Pretraining clip `index`: the generic motion and kinds of `corpus_spec(index, seed)`."""
    motion, kinds = corpus_spec(index, seed)
    return render_world_clip(motion, kinds, index, frames, height, width, seed)


def exemplar_clip(relation: str, index: int, seed: int = 0, frames: int = 25, height: int = 64,
                  width: int = 64) -> WorldClip:
    """A user's relation exemplar: two `person` subjects doing the relation."""
    if relation not in PATTERNS:
        raise ValueError(f"unknown relation {relation!r}; exemplars exist for the relations of synthetic.PATTERNS")
    return render_world_clip(relation, ("person", "person"), index, frames, height, width, seed)


def write_world_catalog(path: str | Path = SYNTH_CATALOG, source: str | Path = DEFAULT_CATALOG) -> Path:
    """Write the world's relation catalog: `source`'s entries (names, NTU ids, verbs, the person training prompts)
    with the world's evaluation prompts (two different non-person kinds each)."""
    entries = yaml.safe_load(Path(source).read_text())["relations"]
    lines = ["# Relation catalog of the synth world (dr_train/data/world.py). GENERATED by",
             "# `python -m dr_train.data.world`: do not edit by hand. The entries of datasets/relations.yaml with",
             "# the same person training prompts; the evaluation prompts name two different non-person kinds",
             "# of the world (pairs the person exemplars never show).", "version: 1", "relations:"]
    for entry in entries:
        name = entry["name"]
        lines.append(f"  - name: {name}")
        for key, value in entry.items():
            if key not in ("name", "eval_prompts"):
                lines.append(f"    {key}: {json.dumps(str(value))}")
        lines.append("    eval_prompts:")
        lines += [f"      - {json.dumps(prompt)}" for prompt in eval_prompts(name)]
        lines.append("")
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    print(write_world_catalog())
