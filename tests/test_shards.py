"""Shard format: bit-exact round trip, manifest verification, and malformed shards named in errors."""
import io
import json
import tarfile

import numpy as np
import pytest

from data_helpers import fake_dataset, fake_sample
from dr_train.data import shards as shard_io


def test_round_trip_is_bit_exact_with_metadata(tmp_path):
    samples = [fake_sample(f"hugging__{i}", "hugging", seed=i) for i in range(3)]
    entry = shard_io.write_shard(tmp_path / "s.tar", samples)
    back = list(shard_io.read_shard(tmp_path / "s.tar"))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back):
        for name, arr in a.arrays().items():
            got = getattr(b, name)
            assert got.dtype == arr.dtype and got.shape == arr.shape
            assert got.tobytes() == arr.tobytes(), name          # bit-exact, not just close
        assert b.meta == a.meta
    assert entry["sha256"] == shard_io.sha256_file(tmp_path / "s.tar")
    assert [s["latent_shape"] for s in entry["samples"]] == [[12, 2, 4, 6]] * 3
    # the same samples always give the same bytes (fixed mtime): re-running a shard is reproducible
    again = shard_io.write_shard(tmp_path / "t.tar", samples)
    assert again["sha256"] == entry["sha256"]


def test_only_requested_keys_are_decoded(tmp_path):
    shard_io.write_shard(tmp_path / "s.tar", [fake_sample(f"k{i}", "hugging", seed=i) for i in range(4)])
    assert [s.key for s in shard_io.read_shard(tmp_path / "s.tar", {"k1", "k3"})] == ["k1", "k3"]


def test_verify_passes_then_catches_a_flipped_byte(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 4, "kicking": 2})
    problems, counts = shard_io.verify_dataset(root)
    assert problems == [] and counts == {"shards": 3, "samples": 6}
    shard = root / "shards" / "hugging-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    problems, _ = shard_io.verify_dataset(root)
    assert len(problems) == 1 and "hugging-000001.tar" in problems[0] and "sha256" in problems[0]


def test_verify_reports_truncated_and_missing_shards(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 6})
    first, second = root / "shards" / "hugging-000000.tar", root / "shards" / "hugging-000001.tar"
    first.write_bytes(first.read_bytes()[:1000])
    second.unlink()
    problems, _ = shard_io.verify_dataset(root)
    assert any("hugging-000000.tar" in p and "truncated" in p for p in problems)
    assert any("hugging-000001.tar" in p and "missing" in p for p in problems)


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_pickle_inside_a_shard_is_refused_naming_it(tmp_path):
    members = {f"k.{s}": b for s, b in shard_io.encode_sample(fake_sample("k", "hugging")).items()}
    members["k.latent_mean.pkl"] = b"\x80\x04\x95 evil pickle"
    _tar(tmp_path / "evil.tar", members)
    with pytest.raises(shard_io.ShardError, match=r"evil\.tar.*'k'.*latent_mean\.pkl.*pickled data is never loaded"):
        list(shard_io.read_shard(tmp_path / "evil.tar"))


def test_an_object_array_npy_is_refused(tmp_path):
    members = {f"k.{s}": b for s, b in shard_io.encode_sample(fake_sample("k", "hugging")).items()}
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members["k.text_embed.npy"] = buf.getvalue()
    _tar(tmp_path / "obj.tar", members)
    with pytest.raises(shard_io.ShardError, match=r"obj\.tar.*text_embed\.npy is not a plain numpy array"):
        list(shard_io.read_shard(tmp_path / "obj.tar"))


@pytest.mark.parametrize("field,value,msg", [
    ("mask_subject1", np.zeros((2, 4, 5), np.float32), "mask_subject1 shape"),
    ("latent_logvar", np.zeros((12, 2, 4, 7), np.float32), "latent_logvar shape"),
    ("latent_mean", np.zeros((12, 4, 6), np.float32), r"latent_mean must be \(C, F, h, w\)"),
    ("text_embed", np.zeros((5, 8), np.float32), "text_embed .* and text_mask .* disagree"),
    ("latent_mean", np.full((12, 2, 4, 6), np.nan, np.float32), "latent_mean holds NaN"),
    ("mask_subject2", np.full((2, 4, 6), 2.0, np.float32), r"mask_subject2 values must lie in \[0, 1\]"),
])
def test_a_wrong_shape_or_value_is_an_error_naming_shard_and_sample(tmp_path, field, value, msg):
    sample = fake_sample("bad_one", "hugging")
    setattr(sample, field, value)
    shard_io.write_shard(tmp_path / "w.tar", [fake_sample("good", "hugging"), sample])
    with pytest.raises(shard_io.ShardError, match=rf"w\.tar: sample 'bad_one': {msg}"):
        list(shard_io.read_shard(tmp_path / "w.tar"))


def test_text_shape_and_channels_are_checked_against_the_dataset(tmp_path):
    shard_io.write_shard(tmp_path / "s.tar", [fake_sample("k", "hugging")])
    with pytest.raises(shard_io.ShardError, match="text encoder gives"):
        list(shard_io.read_shard(tmp_path / "s.tar", text_shape=(8, 8)))
    with pytest.raises(shard_io.ShardError, match="dataset's VAE has 16"):
        list(shard_io.read_shard(tmp_path / "s.tar", latent_channels=16))


def test_a_non_tar_shard_and_a_missing_member_are_errors(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(shard_io.ShardError, match=r"junk\.tar"):
        list(shard_io.read_shard(tmp_path / "junk.tar"))
    members = {f"k.{s}": b for s, b in shard_io.encode_sample(fake_sample("k", "hugging")).items()}
    del members["k.mask_subject2.npy"]
    _tar(tmp_path / "partial.tar", members)
    with pytest.raises(shard_io.ShardError, match=r"partial\.tar: sample 'k' lacks mask_subject2\.npy"):
        list(shard_io.read_shard(tmp_path / "partial.tar"))


def test_manifest_of_another_format_is_refused(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 1})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 99"):
        shard_io.load_manifest(root)
    with pytest.raises(ValueError, match="is not a prepared dataset"):
        shard_io.load_manifest(tmp_path / "nothing")
