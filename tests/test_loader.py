"""The streaming loader: rank x worker splits, determinism, bucketing, relation filter, exact resume."""
from collections import Counter

import pytest
import torch

from data_helpers import CHANNELS, fake_dataset
from dr_train.data.loader import ShardStream, epoch_batches, dataset_refs
from dr_train.data.shards import load_manifest


def _epoch0(stream: ShardStream, max_batches: int = 200) -> list[str]:
    """Keys this rank delivers from epoch 0 (the stream is endless: read until every worker is past epoch 0)."""
    keys, past = [], set()
    for _ in range(max_batches):
        batch = stream.next_batch()
        if batch["epoch"] == 0:
            keys += batch["video_ids"]
        else:
            past.add(stream.delivered % max(1, stream.workers))
            if len(past) == max(1, stream.workers):
                break
    stream.close()
    return keys


@pytest.mark.parametrize("batch_size", [1, 2])
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path, batch_size):
    root = fake_dataset(tmp_path / "ds", {"hugging": 11, "kicking": 5}, per_shard=3)
    seen = []
    for rank in range(2):
        stream = ShardStream(root, ["hugging"], batch_size, seed=7, rank=rank, world_size=2, num_workers=2)
        assert stream.workers == 2
        seen += _epoch0(stream)
    assert Counter(seen) == Counter(f"hugging__{i:04d}" for i in range(11))    # none lost, none twice


def test_ranks_get_disjoint_runs_and_the_plan_is_seeded(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 12}, per_shard=4)
    refs = dataset_refs(root, load_manifest(root), ["hugging"])
    a = [[r.key for r in b] for b in epoch_batches(refs, 2, seed=3, epoch=0)]
    assert a == [[r.key for r in b] for b in epoch_batches(refs, 2, seed=3, epoch=0)]
    assert a != [[r.key for r in b] for b in epoch_batches(refs, 2, seed=3, epoch=1)]
    assert a != [[r.key for r in b] for b in epoch_batches(refs, 2, seed=4, epoch=0)]
    r0 = ShardStream(root, None, 2, seed=3, rank=0, world_size=2)
    r1 = ShardStream(root, None, 2, seed=3, rank=1, world_size=2)
    k0 = [k for _ in range(3) for k in r0.next_batch()["video_ids"]]
    k1 = [k for _ in range(3) for k in r1.next_batch()["video_ids"]]
    assert not set(k0) & set(k1) and len(set(k0 + k1)) == 12


def test_batches_hold_tensors_of_the_right_shapes(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 4})
    batch = ShardStream(root, ["hugging"], 2, seed=0).next_batch()
    assert batch["latents_mean"].shape == (2, CHANNELS, 2, 4, 6) and batch["latents_mean"].dtype == torch.float32
    assert batch["mask_subject1"].shape == (2, 2, 4, 6)
    assert batch["text_embed"].shape == (2, 4, 8) and batch["text_mask"].dtype == torch.bool
    assert batch["relations"] == ["hugging", "hugging"]


def test_relation_filter_and_unknown_relation(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 3, "kicking": 3})
    stream = ShardStream(root, ["kicking"], 1, seed=0)
    assert {stream.next_batch()["relations"][0] for _ in range(9)} == {"kicking"}
    with pytest.raises(ValueError, match="no samples of moonwalking"):
        ShardStream(root, ["moonwalking"], 1)


def test_bucketing_keeps_one_latent_shape_per_batch(tmp_path):
    shapes = lambda i: (CHANNELS, 2 if i % 3 else 3, 4, 6)  # noqa: E731  two frame counts
    root = fake_dataset(tmp_path / "ds", {"hugging": 12}, per_shard=5, shapes=shapes)
    stream = ShardStream(root, ["hugging"], 2, seed=1)
    seen = []
    while True:
        batch = stream.next_batch()
        if batch["epoch"] > 0:
            break
        assert len({tuple(t.shape) for t in batch["latents_mean"]}) == 1
        seen += batch["video_ids"]
    assert sorted(seen) == [f"hugging__{i:04d}" for i in range(12)]


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
    resumed = ShardStream(root, ["hugging"], 2, seed=5, num_workers=workers)
    resumed.load_state_dict(state)
    for want in expected[4:]:
        got = resumed.next_batch()
        assert got["video_ids"] == want["video_ids"] and got["epoch"] == want["epoch"]
        assert torch.equal(got["latents_mean"], want["latents_mean"])
    resumed.close()


def test_a_changed_layout_restarts_the_epoch_with_a_warning(tmp_path, caplog):
    root = fake_dataset(tmp_path / "ds", {"hugging": 8}, per_shard=4)
    two_ranks = ShardStream(root, ["hugging"], 1, seed=2, rank=0, world_size=2)
    for _ in range(6):                                 # 6 of this rank's 4 per epoch: epoch 1 of the global stream
        two_ranks.next_batch()
    one_rank = ShardStream(root, ["hugging"], 1, seed=2)
    with caplog.at_level("WARNING", logger="dr_train"):
        one_rank.load_state_dict(two_ranks.state_dict())
    assert "world_size" in caplog.text and "epoch 1" in caplog.text
    assert one_rank.next_batch()["epoch"] == 1


def test_too_few_samples_for_the_ranks_is_an_error(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 1})
    with pytest.raises(ValueError, match="fewer batches of 1 than the 2 ranks"):
        ShardStream(root, ["hugging"], 1, rank=0, world_size=2)


def test_resampled_epochs_draw_shards_with_replacement(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 12}, per_shard=2)
    refs = dataset_refs(root, load_manifest(root), None)
    draws = [Counter(b[0].shard for b in epoch_batches(refs, 1, seed=0, epoch=e, resampled=True)) for e in range(5)]
    assert any(max(c.values()) > 2 for c in draws)          # some shard drawn twice in an epoch
    assert all(sum(c.values()) == 12 for c in draws)
