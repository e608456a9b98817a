import numpy as np
import pytest

from dr_train.data.tracking import assign, box_iou, track_two_subjects

FRAMES, HEIGHT, WIDTH = 20, 64, 128


def crossing_masks():
    """(F, 2, H, W): a disc moving left -> right and a square moving right -> left; they overlap mid-clip."""
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    masks = np.zeros((FRAMES, 2, HEIGHT, WIDTH), dtype=bool)
    for f in range(FRAMES):
        t = f / (FRAMES - 1)
        disc_x, square_x = 16 + 96 * t, 110 - 92 * t
        masks[f, 0] = (xs - disc_x) ** 2 + (ys - 34) ** 2 <= 10 ** 2
        masks[f, 1] = (abs(xs - square_x) <= 8) & (abs(ys - 28) <= 8)
    return masks


def mask_box(mask_HW):
    ys, xs = np.nonzero(mask_HW)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def shuffled_detections(masks, seed=0, drop=(), spurious=()):
    """Detections from ground-truth boxes in shuffled order; returns boxes, scores and the true subject per box."""
    g = np.random.default_rng(seed)
    boxes, scores, owners = [], [], []
    for f in range(len(masks)):
        items = [(mask_box(masks[f, s]), 0.9 - 0.1 * s, s) for s in range(2) if (f, s) not in drop]
        if f in spurious:
            items.append((np.array([2.0, 50, 12, 62]), 0.35, -1))
        order = g.permutation(len(items))
        boxes.append(np.array([items[i][0] for i in order]).reshape(-1, 4))
        scores.append(np.array([items[i][1] for i in order]))
        owners.append([items[i][2] for i in order])
    return boxes, scores, owners


def test_identity_survives_the_subjects_crossing():
    masks = crossing_masks()
    assert (masks[9, 0] & masks[9, 1]).any() and (masks[10, 0] & masks[10, 1]).any()  # they do overlap
    boxes, scores, owners = shuffled_detections(masks, drop={(10, 0)}, spurious={3, 9, 10, 15})
    tracks = track_two_subjects(boxes, scores)
    assert tracks.anchor_frame == 0
    for f in range(FRAMES):
        for s in range(2):
            d = tracks.indices_F2[f, s]
            if (f, s) == (10, 0):
                assert d == -1  # dropped: the spurious box in that frame must not be taken
            else:
                assert owners[f][d] == s, f"frame {f}: subject{s + 1} took the detection of {owners[f][d]}"
                np.testing.assert_array_equal(tracks.boxes_F24[f, s], mask_box(masks[f, s]))
    assert tracks.missing_frames() == {"subject1": [10], "subject2": []}
    # the dropped frame's box is predicted between the neighbouring disc positions, not carried from the square
    predicted_x = tracks.boxes_F24[10, 0, [0, 2]].mean()
    assert mask_box(masks[9, 0])[[0, 2]].mean() < predicted_x < mask_box(masks[11, 0])[[0, 2]].mean() + 1
    assert tracks.scores_F2[10, 0] == 0 and tracks.scores_F2[0, 0] == pytest.approx(0.9)


def test_a_per_frame_left_right_sort_gets_the_crossing_wrong():
    masks = crossing_masks()
    boxes, scores, owners = shuffled_detections(masks, seed=3)
    naive_subject1 = [owners[f][int(np.argmin(boxes[f][:, 0] + boxes[f][:, 2]))] for f in range(FRAMES)]
    assert naive_subject1[0] == 0 and naive_subject1[-1] == 1  # re-sorting swaps identities after the crossing
    tracks = track_two_subjects(boxes, scores)
    assert [owners[f][tracks.indices_F2[f, 0]] for f in range(FRAMES)] == [0] * FRAMES
    assert [owners[f][tracks.indices_F2[f, 1]] for f in range(FRAMES)] == [1] * FRAMES


def test_same_tracks_whatever_the_detection_order():
    masks = crossing_masks()
    results = []
    for seed in range(4):
        boxes, scores, _ = shuffled_detections(masks, seed=seed, spurious={5})
        results.append(track_two_subjects(boxes, scores).boxes_F24)
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def test_anchor_is_the_first_frame_with_two_subjects_and_earlier_frames_are_tracked_backwards():
    masks = crossing_masks()
    drop = {(0, 1), (1, 1), (1, 0), (2, 0)}
    boxes, scores, owners = shuffled_detections(masks, seed=1, drop=drop)
    tracks = track_two_subjects(boxes, scores)
    assert tracks.anchor_frame == 3
    assert owners[0][tracks.indices_F2[0, 0]] == 0 and tracks.indices_F2[0, 1] == -1
    assert tracks.indices_F2[1].tolist() == [-1, -1]
    assert owners[2][tracks.indices_F2[2, 1]] == 1
    assert tracks.missing_frames() == {"subject1": [1, 2], "subject2": [0, 1]}


def test_anchor_skips_duplicate_and_group_boxes_and_orders_left_to_right():
    boxes = [np.array([[60, 0, 80, 20], [61, 1, 81, 21], [10, 0, 30, 20]], dtype=float)]
    tracks = track_two_subjects(boxes, [np.array([0.9, 0.8, 0.5])])
    assert tracks.indices_F2[0].tolist() == [2, 0]
    # a detector box around both subjects scores highest, but it is not a subject
    boxes = [np.array([[60, 0, 80, 20], [8, 0, 82, 22], [10, 0, 30, 20]], dtype=float)]
    tracks = track_two_subjects(boxes, [np.array([0.7, 0.95, 0.6])])
    assert tracks.indices_F2[0].tolist() == [2, 0]


def test_no_frame_with_two_subjects_is_an_error():
    with pytest.raises(ValueError, match="two distinct detections"):
        track_two_subjects([np.zeros((0, 4)), np.array([[0, 0, 5, 5.0]])], [np.zeros(0), np.ones(1)])
    with pytest.raises(ValueError, match="frame 1: expected"):
        track_two_subjects([np.zeros((2, 4)), np.zeros((2, 3))], [np.ones(2), np.ones(2)])


def test_far_detection_is_gated_and_assignment_is_exact():
    boxes = [np.array([[0, 0, 10, 10], [50, 0, 60, 10]], float), np.array([[0, 0, 10, 10], [200, 90, 210, 100]], float)]
    tracks = track_two_subjects(boxes, [np.ones(2), np.ones(2)])
    assert tracks.indices_F2[1].tolist() == [0, -1]
    np.testing.assert_array_equal(tracks.boxes_F24[1, 1], [50, 0, 60, 10])  # carried forward
    # greedy would give track 0 its best detection (cost 0.1) and leave track 1 with 1.9; exact picks 0.3 + 0.3
    cost = np.array([[0.1, 0.3], [0.3, 1.9]])
    assert assign(cost, max_cost=2.0) == (1, 0)
    assert box_iou(np.array([[0, 0, 2, 2.0]]), np.array([[1, 1, 3, 3.0], [5, 5, 6, 6]])).tolist() == [[1 / 7, 0.0]]
