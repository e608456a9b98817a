"""Bad data inputs: nothing lost, nothing mislabelled. Extending a dataset keeps every earlier sample; shards are
held to the manifest's checksums and shapes as they stream; NaN never passes a check; a bad side file skips one
clip; a malformed manifest or one naming files outside the dataset is a one-line error naming the file."""
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import SIZE, prepare_config, fake_dataset, fake_sample
from dr_train.catalog import load_catalog
from dr_train.data import cli as data_cli
from dr_train.data import prepare as prepare_mod
from dr_train.data import shards as shard_io
from dr_train.data.loader import ShardStream
from dr_train.data.mask_import import save_mask_folder
from dr_train.data.prepare import discover_videos, prepare_dataset
from dr_train.data.synthetic import render_clip
from dr_train.data.video import write_mp4

_cfg = prepare_config


def _clips(root: Path, names: list[str], relation="hugging", first_index=0) -> Path:
    """One rendered clip per name, as <root>/<relation>/<name>.mp4 + <name>_masks/."""
    for i, name in enumerate(names):
        clip = render_clip(relation, first_index + i, 7, 32, 48)
        write_mp4(clip.frames, root / relation / f"{name}.mp4")
        save_mask_folder(root / relation / f"{name}_masks", clip.masks)
    return root


def _ingest(inputs, out, encoder, replace=False, *extra):
    return prepare_dataset(out, discover_videos(list(inputs), load_catalog(), "folders"), _cfg(*extra), encoder,
                           replace=replace)


def _keys(root: Path) -> dict[str, str]:
    """Sample key -> source video of every sample the manifest lists."""
    return {s["key"]: s["source"] for e in shard_io.load_manifest(root)["shards"] for s in e["samples"]}


def _streamed_keys(root: Path, relation: str, n: int) -> set[str]:
    stream = ShardStream(root, [relation], 1, seed=0)
    return {stream.next_batch().video_ids[0] for _ in range(n)}


def _set_manifest(root: Path, edit) -> Path:
    """Rewrite the manifest after `edit` changed it in place; `edit` None writes a JSON list instead."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit is not None:
        edit(manifest)
    path.write_text(json.dumps(manifest if edit is not None else ["not", "an", "object"]))
    return path


# ---- 2: extending a dataset never drops a sample ------------------------------------------------------------
def test_a_second_folder_extends_the_relation_and_a_clash_names_both_videos(tmp_path, encoder, capsys):
    first = _clips(tmp_path / "a", ["a0", "a1", "a2"])
    second = _clips(tmp_path / "b", ["b0", "b1"], first_index=3)
    ds = tmp_path / "ds"
    _ingest([first], ds, encoder, False, "prepare.samples_per_shard=2")
    before = shard_io.load_manifest(ds)["shards"]
    summary = _ingest([second], ds, encoder, False, "prepare.samples_per_shard=2")
    assert summary["samples"] == 2 and summary["shards_built"] == 1
    want = {f"hugging__{n}" for n in ("a0", "a1", "a2", "b0", "b1")}
    assert set(_keys(ds)) == want and shard_io.load_manifest(ds)["relations"]["hugging"]["samples"] == 5
    assert shard_io.load_manifest(ds)["shards"][:2] == before        # the first folder's shards are untouched
    assert shard_io.verify_dataset(ds) == ([], {"shards": 3, "samples": 5})
    assert _streamed_keys(ds, "hugging", 5) == want                  # the trainer's loader sees all of them
    again = _ingest([first], ds, encoder, False, "prepare.samples_per_shard=2")  # a re-run of the first folder
    assert (again["shards_built"], again["shards_kept"]) == (0, 2) and set(_keys(ds)) == want

    # the same clip name from another video: an error naming both (exit code 2 on the command line) ...
    other = _clips(tmp_path / "c", ["a1"], first_index=7)
    clash = str(other / "hugging" / "a1.mp4")
    with pytest.raises(ValueError, match=rf"{clash} and .*a/hugging/a1\.mp4 .*'hugging__a1'.*--replace"):
        _ingest([other], ds, encoder)
    args = ["ingest", str(other), "--out", str(ds), *[a for s in SIZE for a in ("--set", s)]]
    assert data_cli.main(args) == 2
    assert f"error: {clash} and" in capsys.readouterr().err
    assert _keys(ds)["hugging__a1"].endswith("a/hugging/a1.mp4") and set(_keys(ds)) == want
    # ... or, with --replace, the new video takes the old one's place; every other sample stays
    assert data_cli.main(args + ["--replace"]) == 0
    assert set(_keys(ds)) == want and _keys(ds)["hugging__a1"] == clash
    assert shard_io.verify_dataset(ds)[0] == []           # a0, in a1's shard, was carried over intact
    # a shard rebuilt while a sample it must carry over is damaged: stop, naming the shard, sample and video
    _flip_low_latent_byte(ds / "shards" / "hugging-000000.tar", "hugging__a0")
    os.utime(clash, ns=(os.stat(clash).st_atime_ns, os.stat(clash).st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"hugging-000000\.tar is damaged .*'hugging__a0'.*a/hugging/a0\.mp4"):
        _ingest([other], ds, encoder)
    assert set(_keys(ds)) == want


# ---- 4: shards are held to the manifest's checksums and shapes as they are read ------------------------------
def _flip_low_latent_byte(shard: Path, key: str) -> None:
    """Flip the low byte of the last float32 of a sample's latent: a tiny, finite change no range check sees."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{key}.latent_mean.npy")
        at = member.offset_data + member.size - 4
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))


def test_a_flipped_low_byte_in_a_latent_stops_the_loader_naming_shard_and_sample(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 4})
    shard = root / "shards" / "hugging-000000.tar"
    _flip_low_latent_byte(shard, "hugging__0001")
    stream = ShardStream(root, ["hugging"], 2, seed=0)
    with pytest.raises(shard_io.ShardError, match=r"hugging-000000\.tar: sample 'hugging__0001': sha256"):
        for _ in range(2):
            stream.next_batch()
    problems, counts = shard_io.verify_dataset(root)
    assert len(problems) == 1 and "'hugging__0001'" in problems[0] and counts["samples"] == 3


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_corrupt_fills_the_slot_counts_it_and_logs_it(tmp_path, caplog, workers):
    root = fake_dataset(tmp_path / "ds", {"hugging": 4})
    _flip_low_latent_byte(root / "shards" / "hugging-000000.tar", "hugging__0001")
    stream = ShardStream(root, ["hugging"], 2, seed=0, num_workers=workers, skip_corrupt=True)
    with caplog.at_level("WARNING", logger="dr_train"):
        batches = [stream.next_batch() for _ in range(4)]          # two epochs
    stream.close()
    if workers == 0:                           # (a worker process logs to its own handlers)
        assert "corrupt data skipped" in caplog.text and "hugging-000000.tar: sample 'hugging__0001'" in caplog.text
    assert all(len(b.video_ids) == 2 for b in batches)
    assert "hugging__0001" not in {k for b in batches for k in b.video_ids}
    assert [b.corrupt_samples for b in batches].count(1) == 2 and stream.corrupt_samples == 2
    assert stream.state_dict()["corrupt_samples"] == 2
    for b in batches:                          # the filled slot holds a copy of an intact sample of the batch
        if b.corrupt_samples:
            assert b.video_ids[0] == b.video_ids[1] and torch.equal(b.latents_mean[0], b.latents_mean[1])


def test_a_shape_the_manifest_does_not_promise_is_named(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 2})
    _set_manifest(root, lambda m: m["shards"][0]["samples"][1].update(latent_shape=[12, 2, 4, 5]))
    problems, _ = shard_io.verify_dataset(root)
    assert problems == [f"{root / 'shards' / 'hugging-000000.tar'}: sample 'hugging__0001' has latent shape "
                        f"[12, 2, 4, 6], the manifest says [12, 2, 4, 5]"]


def test_an_older_manifest_without_sample_checksums_yields_nothing_from_an_altered_shard(tmp_path):
    root = fake_dataset(tmp_path / "ds", {"hugging": 3})
    _set_manifest(root, lambda m: [s.pop("sha256") for s in m["shards"][0]["samples"]])
    entry = shard_io.load_manifest(root)["shards"][0]
    shard = root / entry["name"]
    _flip_low_latent_byte(shard, "hugging__0002")
    got = []
    with pytest.raises(shard_io.ShardError, match=r"hugging-000000\.tar: sha256 does not match.*'hugging__0000'"):
        got.extend(shard_io.read_shard(shard, entry=entry))
    assert got == []                           # a sample of an altered shard is never handed out unchecked


# ---- 5: NaN is caught at prepare, verify and load -------------------------------------------------------------
def _dataset_with(tmp_path, field: str, value) -> Path:
    """A two-sample dataset whose second sample has `field` set to `value`, with a manifest that matches it."""
    root = fake_dataset(tmp_path / "ds", {"hugging": 2})
    samples = [fake_sample(f"hugging__{i:04d}", "hugging", seed=i) for i in range(2)]
    setattr(samples[1], field, value)
    entry = shard_io.write_shard(root / "shards" / "hugging-000000.tar", samples)
    _set_manifest(root, lambda m: m["shards"][0].update(entry))
    return root


def test_nan_in_a_mask_fails_verify_and_load_naming_the_sample(tmp_path):
    mask = np.full((2, 4, 6), 0.5, np.float32)
    mask[1, 2, 3] = np.nan
    root = _dataset_with(tmp_path, "mask_subject1", mask)
    problems, _ = shard_io.verify_dataset(root)
    assert len(problems) == 1 and "sample 'hugging__0001': mask_subject1 holds NaN" in problems[0]
    with pytest.raises(shard_io.ShardError, match=r"hugging-000000\.tar: sample 'hugging__0001': mask_subject1 "
                                                  r"holds NaN"):
        ShardStream(root, ["hugging"], 2).next_batch()
    assert data_cli.main(["verify", str(root)]) == 1


def test_nan_masks_at_prepare_skip_the_clip_naming_the_video(tmp_path, encoder, monkeypatch):
    videos = _clips(tmp_path / "v", ["n0"])
    real = prepare_mod.latent_masks
    monkeypatch.setattr(prepare_mod, "latent_masks", lambda m, pooling="mean": real(m, pooling=pooling) * np.nan)
    summary = _ingest([videos], tmp_path / "ds", encoder)
    assert summary["samples"] == 0 and len(summary["skipped"]) == 1
    assert summary["skipped"][0]["reason"].startswith(f"{videos / 'hugging' / 'n0.mp4'}: sample 'hugging__n0': "
                                                      f"mask_subject1 holds NaN")


# ---- 6: a bad file beside a video skips that clip, never the ingest ------------------------------------------
def test_a_foreign_json_or_bad_caption_beside_a_video_skips_only_that_clip(tmp_path, encoder, caplog):
    videos = _clips(tmp_path / "v", ["good", "foreign", "broken", "wrong", "quiet"])
    folder = videos / "hugging"
    (folder / "foreign.json").write_text(json.dumps({"labels": ["two people"], "annotator": "someone else"}))
    (folder / "broken.json").write_text("{not json")
    (folder / "wrong.json").write_text(json.dumps({"boxes_xyxy": [[0, 0, 1, 1]]}))
    (folder / "quiet.txt").write_text("  \n")
    with caplog.at_level("WARNING", logger="dr_train"):
        summary = _ingest([videos], tmp_path / "ds", encoder)
    reasons = {Path(s["source"]).stem: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"foreign", "broken", "wrong", "quiet"} and summary["samples"] == 1
    assert reasons["foreign"].startswith(f"{folder / 'foreign.json'}: ") and "not a dr_train ground-truth" in \
        reasons["foreign"]
    assert reasons["broken"].startswith(f"{folder / 'broken.json'}: ") and "not readable JSON" in reasons["broken"]
    assert reasons["wrong"].startswith(f"{folder / 'wrong.json'}: ") and "7 frames" in reasons["wrong"]
    assert reasons["quiet"].startswith(f"{folder / 'quiet.txt'}: caption file is empty")
    for name in ("foreign.json", "broken.json", "wrong.json", "quiet.txt"):
        assert name in caplog.text
    assert list(_keys(tmp_path / "ds")) == ["hugging__good"]


# ---- 8: a malformed manifest is one line naming the file and the defect ---------------------------------------
@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("shards"), "lacks 'shards'"),
    (lambda m: m["encoder"].update(text_dim="wide"), "encoder.text_dim must be a positive integer, got 'wide'"),
    (lambda m: m["shards"][0].pop("name"), r"shards\[0\]\.name must be a non-empty string"),
    (lambda m: m["shards"][0]["samples"][0].update(latent_shape=[12, 2]),
     r"shards\[0\] \(shards/hugging-000000\.tar\)\.samples\[0\]\.latent_shape must be 4 positive integers"),
    (lambda m: m["shards"][0].update(bytes=-1), r"\.bytes must be a byte count, got -1"),
    (lambda m: m["shards"][0].update(sha256=None), r"\.sha256 must be 64 lowercase hex digits"),
    (lambda m: m["shards"].append(m["shards"][0]), "sample 'hugging__0000' is listed twice"),
    (lambda m: m["relations"].update(hugging=3), "relations.hugging must be an object"),
    (None, "must be a JSON object, got a list"),
])
def test_a_malformed_manifest_is_one_line_naming_the_file(tmp_path, capsys, edit, message):
    root = fake_dataset(tmp_path / "ds", {"hugging": 2})
    path = _set_manifest(root, edit)
    with pytest.raises(ValueError, match=rf"^dataset manifest {path}:? .*{message}") as err:
        shard_io.load_manifest(root)
    assert "\n" not in str(err.value)
    assert data_cli.main(["verify", str(root)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: dataset manifest {path}")


# ---- 12: a manifest cannot name a file outside the dataset ---------------------------------------------------
def _point_outside(root: Path, how: str) -> None:
    outside = root.parent / "x.tar"
    shutil.copy(root / "shards" / "hugging-000000.tar", outside)
    if how == "dotdot":
        _set_manifest(root, lambda m: m["shards"][0].update(name="../x.tar"))
    elif how == "absolute":
        _set_manifest(root, lambda m: m["shards"][0].update(name=str(outside)))
    elif how == "symlink":
        os.remove(root / "shards" / "hugging-000000.tar")
        os.symlink(outside, root / "shards" / "hugging-000000.tar")
    elif how == "relations":
        _set_manifest(root, lambda m: m["relations"]["hugging"].update(shards=["shards/../../x.tar"]))
    else:
        _set_manifest(root, lambda m: m.update(null_text="../null.safetensors"))


@pytest.mark.parametrize("how,message", [
    ("dotdot", r"shards\[0\]\.name: '\.\./x\.tar' leaves the dataset folder"),
    ("absolute", r"shards\[0\]\.name: '/.*/x\.tar' leaves the dataset folder"),
    ("symlink", r"shards\[0\]\.name: 'shards/hugging-000000\.tar' leads outside the dataset folder .* symbolic link"),
    ("relations", r"relations\.hugging\.shards: 'shards/\.\./\.\./x\.tar' leaves the dataset folder"),
    ("null_text", r"null_text: '\.\./null\.safetensors' leaves the dataset folder"),
])
def test_a_path_leaving_the_dataset_folder_is_refused(tmp_path, capsys, how, message):
    root = fake_dataset(tmp_path / "ds", {"hugging": 2})
    _point_outside(root, how)
    with pytest.raises(ValueError, match=message):
        ShardStream(root, ["hugging"], 1)
    assert data_cli.main(["verify", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: dataset manifest {root / 'manifest.json'}") and err.count("\n") == 1


def test_training_with_skip_corrupt_counts_the_damaged_sample_in_the_metrics(tmp_path):
    from conftest import small_config
    from dr_train.data.sources import resolve_dataset
    from dr_train.trainer import train

    cfg = small_config(tmp_path, **{"train.relations": "handshaking", "train.max_steps": 4})
    source = resolve_dataset(cfg, [load_catalog()["handshaking"]])
    copy = tmp_path / "dataset"
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["relation"] == "handshaking")
    _flip_low_latent_byte(shard_io.dataset_file(copy, shard["name"]), shard["samples"][0]["key"])
    train(small_config(tmp_path, **{"train.relations": "handshaking", "train.max_steps": 8,
                                    "data.source": str(copy), "data.skip_corrupt": "true"}))
    rows = [json.loads(line) for line in (tmp_path / "runs" / "handshaking" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 9))            # 8 clips drawn from the 6: every one read
    assert rows[-1]["corrupt_samples"] >= 1 and all(np.isfinite(r["loss"]) for r in rows)
