"""The synth world: kinds, generic motions, captions, corpora, its catalog, and the metrics that read it."""
import collections
import dataclasses
import re

import numpy as np
import pytest

from dr_train.catalog import load_catalog
from dr_train.data.synthetic import PATTERNS, RELATIONS
from dr_train.data.world import (GENERIC_MOTIONS, KINDS, SYNTH_CATALOG, caption, corpus_clip, corpus_spec,
                                 eval_kinds, eval_prompts, exemplar_clip, hsv_hue, render_world_clip,
                                 write_world_catalog)
from dr_train.eval.judge import (MIN_HUE_SEPARATION, RelationJudge, chroma_vectors, foreground_masks,
                                 hue_vectors, judge_accuracy, track_subject_masks, track_subjects,
                                 two_colour_clusters)
from dr_train.eval.kinds import KindClassifier, kind_accuracy

NON_PERSON = [k for k in KINDS if k != "person"]


def _hue_deg(pixels_N3) -> np.ndarray:
    v = chroma_vectors(pixels_N3)
    return np.degrees(np.arctan2(v[:, 1], v[:, 0]))


def _circular(a, b):
    return np.abs((np.asarray(a) - b + 180.0) % 360.0 - 180.0)


@pytest.fixture(scope="module")
def judge():
    return RelationJudge()


@pytest.fixture(scope="module")
def classifier():
    return KindClassifier()


def test_kinds_have_disjoint_hue_bands_and_distinct_bodies():
    assert len(KINDS) >= 8 and "person" in KINDS
    names = list(KINDS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            la, lb = KINDS[a], KINDS[b]
            gap = _circular(la.hue, lb.hue)
            assert gap >= 40 and gap > la.hue_width + lb.hue_width, (a, b)
            assert (la.shape, la.texture, round(la.aspect, 1)) != (lb.shape, lb.texture, round(lb.aspect, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        KINDS["dog"].hue = 0.0
    # hues are the judge's hue angle: a rendered colour's opponent-axis angle is the one asked for
    import colorsys
    for angle in (0.0, 37.0, 60.0, 100.0, 240.0, 333.0):
        rgb = np.array(colorsys.hsv_to_rgb(hsv_hue(angle), 0.7, 0.9)) * 255
        assert _circular(_hue_deg(rgb[None])[0], angle) < 0.3


def test_clips_are_deterministic_with_exact_disjoint_masks():
    clip = render_world_clip("hugging", ("dog", "owl"), 3)
    again = render_world_clip("hugging", ("dog", "owl"), 3)
    assert np.array_equal(clip.frames, again.frames) and np.array_equal(clip.masks, again.masks)
    assert not np.array_equal(clip.frames, render_world_clip("hugging", ("dog", "owl"), 4).frames)
    assert not np.array_equal(clip.frames, render_world_clip("hugging", ("dog", "owl"), 3, seed=1).frames)
    assert clip.frames.shape == (25, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.masks.shape == (25, 2, 64, 64) and clip.masks.dtype == np.float32 and clip.boxes.shape == (25, 2, 4)
    assert set(np.unique(clip.masks)) == {0.0, 1.0} and clip.masks.sum(axis=1).max() == 1
    for s, kind in enumerate(clip.kinds):
        look = KINDS[kind]
        hues = _hue_deg(clip.frames[clip.masks[:, s] > 0].reshape(-1, 3))
        assert _circular(hues, look.hue).max() <= look.hue_width + 2.0, kind      # every pixel has its kind's hue
        for f in range(25):
            ys, xs = np.nonzero(clip.masks[f, s])
            x0, y0, x1, y1 = clip.boxes[f, s]
            assert len(xs) and xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    never = clip.masks.sum(axis=(0, 1)) == 0                                        # never covered: background
    assert never.mean() > 0.3 and np.ptp(clip.frames[:, never].astype(int), axis=0).max() == 0
    truth = clip.truth()
    assert truth["kinds"] == ["dog", "owl"] and truth["relation"] == "hugging" and truth["frames"] == 25
    assert truth["caption"] == "A dog is hugging an owl." and clip.video_id.startswith("hugging__dog_owl_")
    generic = render_world_clip("idle", ("cat", "cat"), 0, frames=7, height=32, width=48)
    assert generic.frames.shape == (7, 32, 48, 3) and generic.truth()["relation"] is None


def test_unknown_kinds_motions_and_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown kind 'unicorn'"):
        render_world_clip("hugging", ("dog", "unicorn"), 0)
    with pytest.raises(ValueError, match="unknown motion 'moonwalking'"):
        caption("moonwalking", ("dog", "cat"))
    with pytest.raises(ValueError, match="two subjects"):
        caption("hugging", ("dog",))
    with pytest.raises(ValueError, match="16x16"):
        render_world_clip("hugging", ("dog", "cat"), 0, height=8)
    with pytest.raises(ValueError, match="unknown relation 'idle'"):
        exemplar_clip("idle", 0)
    with pytest.raises(ValueError, match="unknown relation"):
        eval_kinds("my_relation")
    with pytest.raises(ValueError, match=">= 0"):
        corpus_spec(-1)


def test_relation_captions_swap_in_the_kinds_with_articles():
    assert caption("handshaking", ("dog", "owl")) == "A dog is shaking hands with an owl."
    assert caption("walking_towards", ("owl", "cat")) == "An owl and a cat are walking towards each other."
    assert caption("patting_on_back", ("bear", "owl")) == "A bear is patting an owl on the back."
    catalog = load_catalog()
    for relation in RELATIONS:
        assert caption(relation, ("person", "person")) == catalog[relation].prompt
        assert exemplar_clip(relation, 0, frames=2, height=16, width=16).caption == catalog[relation].prompt


def test_generic_captions_never_use_a_relation_word():
    allowed = {"a", "an", "is", "with", "and", "are"} | set(KINDS)
    relation_words = set()
    for relation in load_catalog().values():
        relation_words |= set(re.findall(r"[a-z]+", relation.prompt.lower().replace("-", " "))) - allowed
    assert {"shaking", "hands", "walking", "towards", "each", "other", "the", "back"} <= relation_words
    assert len(GENERIC_MOTIONS) >= 5 and not set(GENERIC_MOTIONS) & set(PATTERNS)
    for motion in GENERIC_MOTIONS:
        for a in KINDS:
            for b in KINDS:
                text = caption(motion, (a, b))
                words = re.findall(r"[a-z]+", text.lower())
                assert not set(words) & relation_words, (text, set(words) & relation_words)
                assert text.startswith(("A ", "An ")) and a in text and b in text
    assert caption("drifting", ("owl", "dog")) == "An owl and a dog are drifting around."


def test_eval_prompts_name_two_different_non_person_kinds_spread_over_kinds():
    pairs_seen = collections.Counter()
    for relation in RELATIONS:
        pairs, prompts = eval_kinds(relation), eval_prompts(relation)
        assert len(pairs) == len(prompts) == 10 and len(set(pairs)) == 10
        assert pairs == eval_kinds(relation)
        uses = collections.Counter(k for pair in pairs for k in pair)
        assert set(uses) == set(NON_PERSON) and max(uses.values()) <= 4
        for (a, b), prompt in zip(pairs, prompts):
            assert a != b and "person" not in (a, b)
            assert prompt == caption(relation, (a, b)) and "person" not in prompt
        pairs_seen.update(pairs)
    assert len(pairs_seen) == len(NON_PERSON) * (len(NON_PERSON) - 1)        # every ordered pair is evaluated


def test_corpus_is_uniform_over_generic_motions_and_kinds():
    specs = [corpus_spec(i) for i in range(400)]
    motions = collections.Counter(m for m, _ in specs)
    kinds = collections.Counter(k for _, pair in specs for k in pair)
    assert set(motions) == set(GENERIC_MOTIONS) and set(kinds) == set(KINDS)
    assert max(motions.values()) - min(motions.values()) <= 20           # 50 each expected
    assert max(kinds.values()) - min(kinds.values()) <= 35               # 100 each expected
    assert 25 <= sum(a == b for _, (a, b) in specs) <= 75                # same-kind pairs: 1/8 = 50 expected
    block = len(GENERIC_MOTIONS) * len(KINDS) ** 2
    assert len({corpus_spec(i) for i in range(block)}) == block          # each combination once per block
    assert [corpus_spec(i, seed=1) for i in range(20)] != specs[:20]
    clip = corpus_clip(17)
    assert (clip.motion, clip.kinds) == specs[17] and np.array_equal(clip.frames, corpus_clip(17).frames)


def test_generic_clips_of_two_kinds_start_with_the_earlier_kind_on_the_left():
    order, sides = list(KINDS), set()
    for index in range(160):
        clip = corpus_clip(index, frames=3, height=32, width=32)
        body_x = [(clip.masks[0, s] > 0).nonzero()[1].mean() for s in range(2)]   # subject 1 is never occluded
        if clip.kinds[0] == clip.kinds[1]:
            sides.add(body_x[0] < body_x[1])
            continue
        earlier = 0 if order.index(clip.kinds[0]) < order.index(clip.kinds[1]) else 1
        assert body_x[earlier] < body_x[1 - earlier], clip.video_id
        assert clip.caption == caption(clip.motion, clip.kinds)          # captions keep either order
    assert sides == {True, False}                                        # same-kind pairs: either side


def test_generic_motions_never_bring_the_subjects_into_contact_and_cover_the_poses():
    lying, reaching = set(), set()
    for i in range(48):
        motion = list(GENERIC_MOTIONS)[i % len(GENERIC_MOTIONS)]
        kinds = ("person", NON_PERSON[i % 7]) if (i // len(GENERIC_MOTIONS)) % 2 else (NON_PERSON[i % 7], "person")
        clip = render_world_clip(motion, kinds, i, frames=13)
        b = clip.boxes
        apart_x = (b[:, 0, 2] <= b[:, 1, 0]) | (b[:, 1, 2] <= b[:, 0, 0])
        apart_y = (b[:, 0, 3] <= b[:, 1, 1]) | (b[:, 1, 3] <= b[:, 0, 1])
        assert (apart_x | apart_y).all(), (motion, kinds, i)               # boxes (arms included) never meet
        s = kinds.index("person")
        width, height = b[:, s, 2] - b[:, s, 0], b[:, s, 3] - b[:, s, 1]
        if motion in ("waving", "stretching"):
            if (width > 0.9 * height).any():             # an upright person is 1.6x taller than wide, with an
                reaching.add(motion)                     # arm out 1.6x wider than without
        elif (width > 1.5 * height).any():               # lying: 2.6x wider than tall (crouching: at most 1.2x)
            lying.add((motion, s))
    assert lying == {("lying_down", 0), ("lying_down", 1)}
    assert reaching == {"waving", "stretching"}


def test_same_kind_subjects_take_the_band_ends_and_stay_separable():
    for kind in KINDS:
        for index in range(2):
            clip = render_world_clip("hugging", (kind, kind), index, frames=13)
            fg = foreground_masks(clip.frames)
            separation = two_colour_clusters(hue_vectors(clip.frames[fg]))[1]
            assert MIN_HUE_SEPARATION + 8 <= separation <= 2 * KINDS[kind].hue_width + 1, (kind, separation)
    clip = exemplar_clip("hugging", 5)                   # contact: the subjects' pixels touch
    tracks, masks = track_subject_masks(clip.frames)
    true_x_F2 = np.stack([[np.nonzero(clip.masks[f, s])[1].mean() for s in range(2)] for f in range(25)])
    true_x_F2 = true_x_F2[:, ::-1] if clip.mirrored else true_x_F2
    assert np.abs(tracks.centres_F22[..., 0] - true_x_F2).max() < 3.0
    truth = clip.masks[:, ::-1] > 0 if clip.mirrored else clip.masks > 0
    assert (masks & truth).sum() / truth.sum() > 0.9 and (masks & ~truth).sum() / masks.sum() < 0.05


def test_judge_reads_the_relation_with_any_kinds(judge):
    mixed, person, labels = [], [], []
    for k, relation in enumerate(RELATIONS):
        mixed.append(render_world_clip(relation, eval_kinds(relation)[k % 10], 100, seed=0).frames)
        person.append(exemplar_clip(relation, 100 + k % 3, seed=0).frames)
        labels.append(relation)
    for videos in (mixed, person):
        result = judge_accuracy(judge, videos, labels)
        assert result["undetected"] == 0 and result["accuracy"] >= 0.9, list(zip(labels, result["predictions"]))
    assert track_subjects(mixed[0]).found_F2.all()


def test_judge_spreads_generic_clips_over_several_relations(judge):
    predictions = collections.Counter(judge.classify(corpus_clip(200 + i, frames=13).frames)[0] for i in range(24))
    assert None not in predictions and len(predictions) >= 3
    assert max(predictions.values()) <= 12, predictions


def test_kind_classifier_names_both_subjects(classifier):
    videos, kinds = [], []
    for k, relation in enumerate(RELATIONS[::2]):
        for clip in (render_world_clip(relation, eval_kinds(relation)[k % 10], 300 + k),
                     exemplar_clip(relation, 300 + k), corpus_clip(300 + k)):
            videos.append(clip.frames)
            kinds.append(clip.kinds)
    result = kind_accuracy(classifier, videos, kinds)
    assert result["undetected"] == 0 and result["accuracy"] >= 0.95, result["confusions"]
    assert result["total"] == 2 * len(videos)
    clip = render_world_clip("handshaking", ("frog", "robot"), 900, height=96, width=96)
    assert sorted(classifier.classify(clip.frames)) == ["frog", "robot"]
    assert classifier.subject_fidelity(clip.frames, ("robot", "frog"))
    assert not classifier.subject_fidelity(clip.frames, ("robot", "owl"))
    assert not classifier.shows_person(clip.frames)
    assert classifier.shows_person(exemplar_clip("handshaking", 900).frames)
    with pytest.raises(ValueError, match="two of the world's kinds"):
        classifier.subject_fidelity(clip.frames, ("robot", "unicorn"))
    with pytest.raises(ValueError, match="unknown: unicorn"):
        KindClassifier(kinds=["dog", "unicorn"])


def test_kind_classifier_reports_videos_without_two_subjects(classifier):
    blank = np.full((8, 64, 64, 3), 40, dtype=np.uint8)
    assert classifier.classify(blank) is None and not classifier.subject_fidelity(blank, ("dog", "cat"))
    clip = render_world_clip("walking_towards", ("dog", "cat"), 0, frames=13)
    one = clip.frames.copy()
    background = clip.frames[0, :, :1].astype(np.float32)                    # column 0 is background throughout
    one[clip.masks[:, 1] > 0] = np.broadcast_to(background, one.shape)[clip.masks[:, 1] > 0]
    assert classifier.classify(one) is None                                # one blob only: not found, no crash
    assert kind_accuracy(classifier, [blank], [("dog", "cat")])["undetected"] == 1


def test_the_world_catalog_is_generated_and_current(tmp_path):
    path = write_world_catalog(tmp_path / "synth.yaml")
    assert path.read_text() == SYNTH_CATALOG.read_text(), "run `python -m dr_train.data.world`"
    assert "python -m dr_train.data.world" in path.read_text().splitlines()[1]
    base, world = load_catalog(), load_catalog(path)
    assert list(world) == list(base)
    for name, relation in world.items():
        assert relation.prompt == base[name].prompt and relation.verb == base[name].verb
        assert relation.ntu_action == base[name].ntu_action
        assert list(relation.eval_prompts) == eval_prompts(name)
