import torch

from dr_train.memory_bank import MemoryBank


def _feat(v, T=2, C=3):
    return torch.full((1, T, C), float(v)), torch.full((1, T + 1, C), float(v) + 0.5)


def test_fifo_capacity_and_skip_reason():
    bank = MemoryBank(capacity=3, n_pos=2, n_neg=2, seed=0)
    dyn, means = _feat(0)
    pos, neg, reason = bank.sample(["v0"], dyn, means)
    assert pos is None and "0 of 2 positives" in reason
    for i in range(5):
        bank.push([f"v{i}"], *_feat(i))
    assert len(bank) == 3 and [e.video_id for e in bank.entries] == ["v2", "v3", "v4"]


def test_positives_come_from_other_videos_matched_by_frame():
    bank = MemoryBank(capacity=8, n_pos=2, n_neg=3, seed=0)
    bank.push(["a"], *_feat(1))
    bank.push(["b"], *_feat(2))
    dyn, means = _feat(1)
    pos, neg, reason = bank.sample(["a"], dyn, means)     # only 'b' is another video: not enough
    assert pos is None and "1 of 2" in reason
    bank.push(["c"], *_feat(3))
    pos, neg, reason = bank.sample(["a"], dyn, means)
    assert reason is None and pos.shape == (1, 2, 2, 3) and neg.shape == (1, 2, 3, 3)
    assert set(pos[0, 0, :, 0].tolist()) == {2.0, 3.0}    # never its own video
    assert set(neg.flatten().tolist()) <= {1.5, 2.5, 3.5}  # single-frame features of this video and the bank


def test_state_round_trip_reproduces_sampling():
    bank = MemoryBank(capacity=8, n_pos=2, n_neg=3, seed=5)
    for i in range(6):
        bank.push([f"v{i}"], torch.randn(1, 2, 4), torch.randn(1, 3, 4))
    tensors, meta = bank.state_dict()
    other = MemoryBank(capacity=8, n_pos=2, n_neg=3, seed=99)
    other.load_state_dict(tensors, meta)
    q = torch.randn(1, 2, 4), torch.randn(1, 3, 4)
    a, b = bank.sample(["x"], *q), other.sample(["x"], *q)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_official_bank_draws_per_anchor_frame_allows_the_same_video_and_adds_bank_negatives():
    from dr_train.memory_bank import OfficialMemoryBank

    bank = OfficialMemoryBank(positive_size=2, negative_frames=4, n_pos=4, n_neg=5, seed=0)
    dyn, means = _feat(7)                                          # T=2 anchors, F=3 frames, C=3
    picks, reason = bank.sample(["a"], dyn, means)
    assert picks is None and "holds no clip" in reason             # the first step has no positive
    for i in range(3):
        bank.push(["a"], *_feat(i))                                # the same video id: still a positive
    assert len(bank) == 2 and len(bank.negatives) == 4             # FIFOs of 2 clips and 4 frames
    picks, reason = bank.sample(["a"], dyn, means)
    positives, negatives = picks[0]
    assert positives.shape == (2, 2, 3)                            # min(n_pos=4, 2 clips held) per anchor
    assert set(positives[:, :, 0].flatten().tolist()) == {1.0, 2.0}
    assert negatives.shape == (2, 2, 3)                            # n_neg 5 - 3 own frames = 2 from the bank
    assert set(negatives.flatten().tolist()) <= {1.5, 2.5}


def test_official_bank_serves_a_batch_in_order_and_round_trips():
    from dr_train.memory_bank import OfficialMemoryBank

    bank = OfficialMemoryBank(positive_size=3, negative_frames=6, n_pos=1, n_neg=3, seed=2)
    dyn = torch.stack([_feat(1)[0][0], _feat(2)[0][0]])
    means = torch.stack([_feat(1)[1][0], _feat(2)[1][0]])
    picks, reason = bank.sample(["x", "y"], dyn, means)
    assert picks[0] is None and picks[1][0][0, 0, 0] == 1.0       # clip y sees clip x as pushed before it
    bank.push(["x", "y"], dyn, means)
    tensors, meta = bank.state_dict()
    other = OfficialMemoryBank(positive_size=3, negative_frames=6, n_pos=1, n_neg=3, seed=9)
    other.load_state_dict(tensors, meta)
    a, b = bank.sample(["z"], *_feat(5)), other.sample(["z"], *_feat(5))
    assert torch.equal(a[0][0][0], b[0][0][0]) and torch.equal(a[0][0][1], b[0][0][1])
