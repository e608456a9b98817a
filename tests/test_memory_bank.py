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
