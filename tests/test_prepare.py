"""Ingest end to end on the tiny preset: videos + PNG masks -> shards; bad inputs counted and named; re-runs."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from data_helpers import prepare_config
from dr_train.catalog import load_catalog
from dr_train.data import shards as shard_io
from dr_train.data.mask_import import load_mask_folder, save_mask_folder
from dr_train.data.prepare import discover_videos, prepare_dataset
from dr_train.data.synthetic import render_clip, write_synthetic_videos
from dr_train.data.video import write_mp4
from dr_train.masks import latent_masks

_cfg = prepare_config


def _videos(root, relation="hugging", count=3):
    write_synthetic_videos(root, [relation], count, 7, 32, 48)
    return root


def test_ingest_writes_verified_shards_with_latent_masks_and_truth(tmp_path, encoder):
    videos = _videos(tmp_path / "videos")
    jobs = discover_videos([videos], load_catalog(), "auto")
    assert [j.key for j in jobs] == [f"hugging__hugging_{i:04d}" for i in range(3)]
    summary = prepare_dataset(tmp_path / "ds", jobs, _cfg("prepare.samples_per_shard=2"), encoder)
    assert summary | {"dataset": None} == {"dataset": None, "shards_built": 2, "shards_kept": 0, "samples": 3,
                                           "skipped": []}
    assert shard_io.verify_dataset(tmp_path / "ds") == ([], {"shards": 2, "samples": 3})
    manifest = shard_io.load_manifest(tmp_path / "ds")
    assert manifest["relations"]["hugging"]["samples"] == 3
    assert manifest["encoder"]["latent_channels"] == 12 and manifest["video"]["frames"] == 7
    sample = next(shard_io.read_shard(tmp_path / "ds" / "shards" / "hugging-000000.tar"))
    assert sample.latent_mean.shape == (12, 2, 4, 6)
    png = load_mask_folder(videos / "hugging" / "hugging_0000_masks").masks
    for s, name in enumerate(("mask_subject1", "mask_subject2")):
        want = latent_masks(torch.from_numpy(png[:, s])).numpy()
        np.testing.assert_allclose(getattr(sample, name), want, atol=1e-6)
    assert sample.meta["relation"] == "hugging" and sample.meta["frames"] == 7
    assert sample.meta["prompt"] == load_catalog()["hugging"].prompt
    truth = render_clip("hugging", 0, 7, 32, 48)
    np.testing.assert_allclose(np.array(sample.meta["truth"]["boxes_xyxy"]), truth.boxes, atol=0.01)
    # text embedding = the tiny T5's embedding of the relation prompt
    embed, mask = encoder.encode_text(load_catalog()["hugging"].prompt)
    assert np.array_equal(sample.text_embed, embed) and np.array_equal(sample.text_mask, mask)


def _bad_inputs(folder):
    """Four broken clips beside good ones: truncated video, too few frames, missing mask frame, empty mask."""
    good = folder / "hugging_0000.mp4"
    (folder / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    shutil.copytree(folder / "hugging_0000_masks", folder / "truncated_masks")
    short = render_clip("hugging", 9, 4, 32, 48)
    write_mp4(short.frames, folder / "short.mp4")
    save_mask_folder(folder / "short_masks", short.masks)
    for name in ("gap", "empty"):
        shutil.copy(good, folder / f"{name}.mp4")
        shutil.copytree(folder / "hugging_0000_masks", folder / f"{name}_masks")
    os.remove(sorted((folder / "gap_masks").iterdir())[3])
    masks = load_mask_folder(folder / "empty_masks").masks
    masks[:, 1] = 0
    shutil.rmtree(folder / "empty_masks")
    save_mask_folder(folder / "empty_masks", masks)


def test_bad_inputs_are_counted_logged_and_named_never_dropped(tmp_path, encoder, caplog):
    videos = _videos(tmp_path / "videos")
    _bad_inputs(videos / "hugging")
    jobs = discover_videos([videos], load_catalog(), "folders")
    with caplog.at_level("WARNING", logger="dr_train"):
        summary = prepare_dataset(tmp_path / "ds", jobs, _cfg(), encoder)
    reasons = {os.path.basename(s["source"]): s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"truncated.mp4", "short.mp4", "gap.mp4", "empty.mp4"}
    assert "truncated.mp4" in reasons["truncated.mp4"]
    assert "short.mp4" in reasons["short.mp4"] and "frames" in reasons["short.mp4"]
    assert "gap_masks" in reasons["gap.mp4"] and "missing" in reasons["gap.mp4"]
    assert "empty" in reasons["empty.mp4"].lower()
    assert summary["samples"] == 3
    manifest = shard_io.load_manifest(tmp_path / "ds")
    assert sorted(os.path.basename(s["source"]) for s in manifest["skipped"]) == sorted(reasons)
    for name in reasons:
        assert name in caplog.text
    with pytest.raises(ValueError, match=r"empty\.mp4.*empty mask"):       # the first bad clip in key order
        prepare_dataset(tmp_path / "strict", jobs, _cfg("prepare.strict=true"), encoder)


def test_rerun_skips_finished_shards_and_rebuilds_changed_ones(tmp_path, encoder):
    videos = _videos(tmp_path / "videos", count=4)
    jobs = discover_videos([videos], load_catalog(), "folders")
    cfg = _cfg("prepare.samples_per_shard=2")
    prepare_dataset(tmp_path / "ds", jobs, cfg, encoder)
    first = shard_io.load_manifest(tmp_path / "ds")
    again = prepare_dataset(tmp_path / "ds", jobs, cfg, encoder)
    assert (again["shards_built"], again["shards_kept"]) == (0, 2)
    video = videos / "hugging" / "hugging_0003.mp4"
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))
    third = prepare_dataset(tmp_path / "ds", jobs, cfg, encoder)
    assert (third["shards_built"], third["shards_kept"]) == (1, 1)
    manifest = shard_io.load_manifest(tmp_path / "ds")
    assert manifest["shards"][0]["sha256"] == first["shards"][0]["sha256"]
    assert manifest["shards"][1]["sha256"] == first["shards"][1]["sha256"]    # same inputs give the same bytes
    # another relation extends the dataset without touching hugging's shards
    more = _videos(tmp_path / "more", "kicking", 2)
    prepare_dataset(tmp_path / "ds", discover_videos([more], load_catalog(), "folders"), cfg, encoder)
    manifest = shard_io.load_manifest(tmp_path / "ds")
    assert sorted(manifest["relations"]) == ["hugging", "kicking"] and len(manifest["shards"]) == 3
    with pytest.raises(ValueError, match="was prepared with"):
        prepare_dataset(tmp_path / "ds", jobs, _cfg("prepare.frames=13"), encoder)


def test_ntu_layout_maps_action_ids_to_relations(tmp_path, encoder):
    clip = render_clip("handshaking", 0, 7, 32, 48)
    for name in ("S001C001P001R001A058_rgb", "S002C003P008R002A112_rgb", "S001C001P001R001A001_rgb"):
        write_mp4(clip.frames, tmp_path / "ntu" / "nested" / f"{name}.avi")
        save_mask_folder(tmp_path / "ntu" / "nested" / f"{name}_masks", clip.masks)
    jobs = discover_videos([tmp_path / "ntu"], load_catalog(), "auto")
    assert sorted((j.relation, j.key) for j in jobs) == [
        ("handshaking", "handshaking__S001C001P001R001A058_rgb"), ("high_five", "high_five__S002C003P008R002A112_rgb")]
    assert prepare_dataset(tmp_path / "ds", jobs, _cfg(), encoder)["samples"] == 2


def test_unknown_relation_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "videos" / "moonwalking").mkdir(parents=True)
    with pytest.raises(ValueError, match="moonwalking.*not a relation of the catalog"):
        discover_videos([tmp_path / "videos"], load_catalog(), "folders")


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "launch" / "prepare.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_command_line_synthetic_verify_and_sheet(tmp_path):
    """The default path with 2 spawned decode workers, then verify (catching a flipped byte) and a sheet."""
    proc = _run("synthetic", "--out", "ds", "--relations", "pushing", "--count", "3", "--set", "prepare.frames=7",
                "--set", "prepare.height=32", "--set", "prepare.width=48", "--set", "prepare.workers=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["samples"] == 3 and "video/s" in proc.stderr
    proc = _run("verify", "ds", cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True
    proc = _run("sheet", "ds", "--relation", "pushing", "--out", "sheet.png", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "sheet.png").stat().st_size > 1000
    shard = tmp_path / "ds" / "shards" / "pushing-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = _run("verify", "ds", cwd=tmp_path)
    assert proc.returncode == 1 and "pushing-000000.tar" in proc.stderr and "sha256" in proc.stderr
    proc = _run("ingest", "nope", "--out", "x", cwd=tmp_path)
    assert proc.returncode == 2 and "nope does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_grounding_sam_masks_when_a_clip_has_no_mask_folder(tmp_path, encoder):
    """masks=auto without a PNG folder runs Grounding DINO + SAM (tiny random models from configs)."""
    from test_segment import build_tiny_grounding_dino, build_tiny_sam

    build_tiny_grounding_dino(tmp_path / "gdino")
    build_tiny_sam(tmp_path / "sam")
    videos = _videos(tmp_path / "videos", count=2)
    for folder in (videos / "hugging").glob("*_masks"):
        shutil.rmtree(folder)
    jobs = discover_videos([videos], load_catalog(), "folders")
    assert all(j.mask_dir == "" for j in jobs)
    with pytest.raises(ValueError, match="prepare.grounding_dino / prepare.sam are not set"):
        prepare_dataset(tmp_path / "none", jobs, _cfg("prepare.strict=true"), encoder)
    cfg = _cfg(f"prepare.grounding_dino={tmp_path / 'gdino'}", f"prepare.sam={tmp_path / 'sam'}",
               "prepare.box_threshold=0", "prepare.text_threshold=0")
    summary = prepare_dataset(tmp_path / "ds", jobs, cfg, encoder)
    assert summary["samples"] == 2 and summary["skipped"] == []
    for shard in shard_io.load_manifest(tmp_path / "ds")["shards"]:
        for sample in shard_io.read_shard(tmp_path / "ds" / shard["name"]):
            assert sample.meta["mask_source"] == "grounding_sam"
            assert sample.mask_subject1.shape == (2, 4, 6)


def test_a_dataset_records_its_encoders_and_older_datasets_are_kept_not_encoded_again(tmp_path, encoder):
    import copy
    from types import SimpleNamespace

    from dr_train.data.sources import check_dataset_matches_model

    jobs = discover_videos([_videos(tmp_path / "videos", count=2)], load_catalog(), "folders")
    cfg = _cfg()
    assert encoder.identity()["base"] == "tiny"
    older = copy.copy(encoder)
    older.base = None                                    # what versions before encoder identities wrote
    prepare_dataset(tmp_path / "old", jobs, cfg, older)
    again = prepare_dataset(tmp_path / "old", jobs, cfg, encoder)
    assert (again["shards_built"], again["shards_kept"]) == (0, 1)
    assert "base" not in shard_io.load_manifest(tmp_path / "old")["encoder"]
    identity = encoder.identity()
    transformer = SimpleNamespace(config=SimpleNamespace(in_channels=identity["latent_channels"],
                                                         text_embed_dim=identity["text_dim"]))
    check_dataset_matches_model(tmp_path / "old", transformer, "tiny")

    retrained = copy.copy(encoder)
    retrained.base = "synth:0123456789abcdef"           # same preset name and shapes, other VAE weights
    prepare_dataset(tmp_path / "new", jobs, cfg, retrained)
    assert shard_io.load_manifest(tmp_path / "new")["encoder"]["base"] == "synth:0123456789abcdef"
    with pytest.raises(ValueError, match="was prepared with encoder"):
        prepare_dataset(tmp_path / "new", jobs, cfg, encoder)
    with pytest.raises(ValueError, match=r"new was encoded by the VAE and T5 of base synth:0123456789abcdef .*"
                                         r"model.preset 'tiny' has encoders tiny"):
        check_dataset_matches_model(tmp_path / "new", transformer, "tiny")
