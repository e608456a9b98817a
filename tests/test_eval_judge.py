"""The programmatic relation judge: accurate on unseen synthetic renders (other sizes, mp4), blind to shuffled time."""
import numpy as np
import pytest

from dr_train.data.synthetic import RELATIONS, render_clip
from dr_train.data.video import decode_video, write_mp4
from dr_train.eval.judge import (RelationJudge, SubjectsNotFound, judge_accuracy, mirror_features,
                                 track_subjects)


@pytest.fixture(scope="module")
def judge():
    """Templates at 25 x 96 x 160 (the defaults); the tests judge other sizes and frame counts."""
    return RelationJudge()


def test_accuracy_on_unseen_renders_at_another_size(judge):
    videos, labels, mirrored = [], [], []
    for relation in RELATIONS:
        for index in range(100, 104):                      # template renders use indices 0..5 at another seed
            clip = render_clip(relation, index, frames=13, height=64, width=64, seed=0)
            videos.append(clip.frames)
            labels.append(relation)
            mirrored.append(clip.mirrored)
    assert 0 < sum(mirrored) < len(mirrored)              # both orientations are judged
    result = judge_accuracy(judge, videos, labels)
    assert result["total"] == 104 and result["undetected"] == 0
    assert result["accuracy"] >= 0.9, result["per_relation"]
    assert all(row["correct"] >= 2 for row in result["per_relation"].values()), result["per_relation"]


def test_accuracy_after_an_mp4_round_trip(judge, tmp_path):
    relations = ["handshaking", "hugging", "pushing", "kicking", "walking_towards", "walking_apart",
                 "following", "high_five", "shooting_with_gun", "rock_paper_scissors"]
    videos = []
    for i, relation in enumerate(relations):
        clip = render_clip(relation, 500 + i, frames=31, height=48, width=80, seed=0)
        decoded = decode_video(write_mp4(clip.frames, tmp_path / f"{relation}.mp4", fps=24)).frames
        assert decoded.shape == clip.frames.shape
        videos.append(decoded)
    result = judge_accuracy(judge, videos, relations)
    assert result["accuracy"] >= 0.9, list(zip(result["labels"], result["predictions"]))


def test_shuffling_frames_in_time_drops_accuracy_to_near_chance(judge):
    rng = np.random.default_rng(0)
    videos, labels, ordered = [], [], []
    for relation in RELATIONS:
        for index in (200, 201):
            frames = render_clip(relation, index, frames=25, height=64, width=96, seed=0).frames
            ordered.append(frames)
            videos.append(frames[rng.permutation(len(frames))])
            labels.append(relation)
    assert judge_accuracy(judge, ordered, labels)["accuracy"] >= 0.9          # the same clips, in order
    shuffled = judge_accuracy(judge, videos, labels)
    assert shuffled["undetected"] == 0
    assert shuffled["accuracy"] <= 0.25, shuffled["predictions"]


def test_a_mirrored_video_gets_the_same_relation(judge):
    for relation in ("following", "pushing", "taking_a_photo"):
        frames = render_clip(relation, 300, frames=25, height=64, width=96, seed=0).frames
        predicted, scores = judge.classify(frames)
        predicted_flipped, scores_flipped = judge.classify(np.ascontiguousarray(frames[:, :, ::-1]))
        assert predicted == predicted_flipped == relation
        assert set(scores) == set(RELATIONS) and max(scores, key=scores.get) == relation
        assert scores[relation] == pytest.approx(scores_flipped[relation], abs=0.02 * abs(scores[relation]) + 1e-4)


def test_tracks_follow_the_true_subjects():
    clip = render_clip("walking_towards", 7, frames=13, height=64, width=96, seed=0)
    tracks = track_subjects(clip.frames)
    assert tracks.found_F2.all()
    true_x_F2 = np.stack([[np.nonzero(clip.masks[f, s])[1].mean() for s in range(2)] for f in range(13)])
    true_x_F2 = true_x_F2[:, ::-1] if clip.mirrored else true_x_F2        # subject 1 is the left one
    assert np.abs(tracks.centres_F22[..., 0] - true_x_F2).max() < 3.0


def test_same_coloured_subjects_are_tracked_as_connected_components(judge):
    clip = render_clip("walking_apart", 8, frames=13, height=64, width=96, seed=0)
    frames = clip.frames.copy()
    colour_1 = np.median(frames[clip.masks[:, 0] > 0], axis=0).astype(np.uint8)
    frames[clip.masks[:, 1] > 0] = colour_1                 # both subjects now share one colour
    tracks = track_subjects(frames)
    assert tracks.found_F2.all()
    true_x_F2 = np.stack([[np.nonzero(clip.masks[f, s])[1].mean() for s in range(2)] for f in range(13)])
    true_x_F2 = true_x_F2[:, ::-1] if clip.mirrored else true_x_F2
    assert np.abs(tracks.centres_F22[..., 0] - true_x_F2).max() < 3.0
    assert judge.classify(frames)[0] == "walking_apart"


def test_mirror_features_is_an_involution():
    feat = np.random.default_rng(1).random((32, 2, 6))
    assert np.allclose(mirror_features(mirror_features(feat)), feat)
    assert np.allclose(mirror_features(feat)[:, 0, 0], 1 - feat[:, 1, 0])


def test_templates_are_deterministic_and_inputs_are_checked():
    a = RelationJudge(relations=["hugging", "pushing"], templates_per_relation=2, frames=13, size=(48, 64))
    b = RelationJudge(relations=["hugging", "pushing"], templates_per_relation=2, frames=13, size=(48, 64))
    assert np.array_equal(a.motion_KT26, b.motion_KT26) and list(a.owner_K) == ["hugging"] * 2 + ["pushing"] * 2
    with pytest.raises(ValueError, match="built-in synthetic relations"):
        RelationJudge(relations=["hugging", "my_relation"])
    with pytest.raises(ValueError, match="at least two"):
        RelationJudge(relations=["hugging"])
    with pytest.raises(ValueError, match="uint8"):
        a.classify(np.zeros((4, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="labels outside"):
        judge_accuracy(a, [np.zeros((4, 32, 32, 3), dtype=np.uint8)], ["kicking"])


def test_a_video_without_two_subjects_is_undetected():
    judge = RelationJudge(relations=["hugging", "pushing"], templates_per_relation=1, frames=13, size=(48, 64))
    blank = np.full((8, 48, 64, 3), 40, dtype=np.uint8)
    with pytest.raises(SubjectsNotFound):
        track_subjects(blank)
    assert judge.classify(blank) == (None, {})
    result = judge_accuracy(judge, [blank], ["hugging"])
    assert result["undetected"] == 1 and result["accuracy"] == 0.0
