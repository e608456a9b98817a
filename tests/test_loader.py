"""The streaming loader: global batches split by rank and worker, determinism, bucketing, filter, exact resume."""
from collections import Counter

import pytest
import torch

from data_helpers import CHANNELS, fake_dataset
from dr_train.data.loader import ShardStream, dataset_refs, epoch_batches
from dr_train.data.shards import load_manifest


def _keys(stream: ShardStream, batches: int) -> list[list[str]]:
    out = [stream.next_batch().video_ids for _ in range(batches)]
    stream.close()
    return out


@pytest.mark.parametrize("samples", [12, 11])
def test_two_ranks_two_workers_lose_and_repeat_nothing(tmp_path, samples):
    """Every `samples` consecutive samples of the global stream hold each sample exactly once."""
    root = fake_dataset(tmp_path / "ds", {"hugging": samples, "kicking": 5}, per_shard=3)
    per_rank = [_keys(ShardStream(root, ["hugging"], 1, seed=7, rank=r, world_size=2, num_workers=2), samples)
                for r in range(2)]
    stream = [k for step in zip(*per_rank) for b in step for k in b]          # global order: step, then rank
    for start in range(0, len(stream) - samples + 1, samples):
        assert Counter(stream[start:start + samples]) == Counter(f"hugging__{i:04d}" for i in range(samples))


def test_ranks_see_the_samples_of_a_one_rank_run_with_the_global_batch(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 10}, per_shard=4)
    one = _keys(ShardStream(root, ["hugging"], 4, seed=3), 8)
    ranks = [_keys(ShardStream(root, ["hugging"], 2, seed=3, rank=r, world_size=2, num_workers=r), 8)
             for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == one


def test_the_worker_count_does_not_change_the_stream(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 7}, per_shard=2)
    want = _keys(ShardStream(root, None, 2, seed=1), 12)
    for workers in (1, 2, 3):
        assert _keys(ShardStream(root, None, 2, seed=1, num_workers=workers), 12) == want


def test_the_plan_is_seeded(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 12}, per_shard=4)
    refs = dataset_refs(root, load_manifest(root), ["hugging"])
    plan = lambda seed, epoch: [[r.key for r in b] for b in epoch_batches(refs, 2, seed, epoch)[0]]  # noqa: E731
    assert plan(3, 0) == plan(3, 0)
    assert plan(3, 0) != plan(3, 1) and plan(3, 0) != plan(4, 0)


def test_batches_hold_tensors_of_the_right_shapes(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 4})
    batch = ShardStream(root, ["hugging"], 2, seed=0).next_batch()
    assert batch.latents_mean.shape == (2, CHANNELS, 2, 4, 6) and batch.latents_mean.dtype == torch.float32
    assert batch.mask_subject1.shape == (2, 2, 4, 6)
    assert batch.text_embed.shape == (2, 4, 8) and batch.text_mask.dtype == torch.bool
    assert batch.relations == ["hugging", "hugging"]


def test_relation_filter_and_unknown_relation(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 3, "kicking": 3})
    stream = ShardStream(root, ["kicking"], 1, seed=0)
    assert {stream.next_batch().relations[0] for _ in range(9)} == {"kicking"}
    with pytest.raises(ValueError, match="no samples of moonwalking"):
        ShardStream(root, ["moonwalking"], 1)


def test_bucketing_keeps_one_latent_shape_per_batch_and_carries_leftovers(tmp_path):
    shapes = lambda i: (CHANNELS, 2 if i % 3 else 3, 4, 6)  # noqa: E731  8 clips of 2 frames, 4 of 3 frames
    root = fake_dataset(tmp_path / "ds", {"hugging": 12}, per_shard=5, shapes=shapes)
    stream = ShardStream(root, ["hugging"], 3, seed=1)
    keys = []
    while True:
        batch = stream.next_batch()
        if batch.epoch == 2:
            break
        assert len({tuple(t.shape) for t in batch.latents_mean}) == 1 and len(batch.video_ids) == 3
        keys += batch.video_ids
    counts = Counter(keys)
    # epochs 0 and 1: every clip twice, except those carried into epoch 2 (at most 2 per shape)
    assert set(counts) == {f"hugging__{i:04d}" for i in range(12)} and set(counts.values()) <= {1, 2}
    assert sum(c == 1 for c in counts.values()) <= 4 and len(keys) % 3 == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_exact_stream(tmp_path, workers):
    root = fake_dataset(tmp_path / "ds", {"hugging": 7}, per_shard=3)
    straight = ShardStream(root, ["hugging"], 2, seed=5, num_workers=workers)
    expected = [straight.next_batch() for _ in range(9)]                      # crosses epoch boundaries
    straight.close()
    first = ShardStream(root, ["hugging"], 2, seed=5, num_workers=workers)
    for _ in range(4):
        first.next_batch()
    state = first.state_dict()
    first.close()
    resumed = ShardStream(root, ["hugging"], 2, seed=5, num_workers=2 - workers)     # other worker count too
    resumed.load_state_dict(state)
    for want in expected[4:]:
        got = resumed.next_batch()
        assert got.video_ids == want.video_ids and got.epoch == want.epoch
        assert torch.equal(got.latents_mean, want.latents_mean)
    resumed.close()


def test_two_rank_state_resumes_on_one_rank_with_the_same_global_batch(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 9}, per_shard=4)
    ranks = [ShardStream(root, None, 1, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        for s in ranks:
            s.next_batch()
    one = ShardStream(root, None, 2, seed=2)
    one.load_state_dict(ranks[0].state_dict())
    want = [a + b for a, b in zip(*[_keys(s, 4) for s in ranks])]
    assert _keys(one, 4) == want


def test_a_changed_global_batch_restarts_the_epoch_with_a_warning(tmp_path, caplog):
    root = fake_dataset(tmp_path / "ds", {"hugging": 8}, per_shard=4)
    two = ShardStream(root, ["hugging"], 2, seed=2)
    for _ in range(6):                                         # 12 samples: inside epoch 1
        two.next_batch()
    one = ShardStream(root, ["hugging"], 1, seed=2)
    with caplog.at_level("WARNING", logger="dr_train"):
        one.load_state_dict(two.state_dict())
    assert "global_batch" in caplog.text and "epoch 1" in caplog.text
    assert one.next_batch().epoch == 1


def test_too_few_samples_for_a_global_batch_is_an_error(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 1})
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardStream(root, ["hugging"], 1, rank=0, world_size=2)


def test_resampled_epochs_draw_shards_with_replacement(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 12}, per_shard=2)
    refs = dataset_refs(root, load_manifest(root), None)
    draws = [Counter(b[0].shard for b in epoch_batches(refs, 1, 0, e, resampled=True)[0]) for e in range(5)]
    assert any(max(c.values()) > 2 for c in draws)          # some shard drawn twice in an epoch
    assert all(sum(c.values()) == 12 for c in draws)
