"""The built-in synthetic relations: exact masks and boxes, determinism, and 26 distinct motion patterns."""
import json

import numpy as np
import pytest

from dr_train.catalog import load_catalog
from dr_train.data.mask_import import load_mask_folder
from dr_train.data.synthetic import PATTERNS, pattern_for, render_clip, write_synthetic_videos


def test_every_catalog_relation_has_its_own_pattern():
    assert set(PATTERNS) == set(load_catalog())
    assert pattern_for("my_new_relation") in PATTERNS.values()


def test_masks_are_exact_disjoint_and_inside_the_boxes():
    clip = render_clip("handshaking", 3, 13, 48, 80)
    assert clip.frames.shape == (13, 48, 80, 3) and clip.frames.dtype == np.uint8
    assert clip.masks.shape == (13, 2, 48, 80) and set(np.unique(clip.masks)) <= {0.0, 1.0}
    assert clip.masks.sum(axis=1).max() == 1                          # subjects never share a pixel
    for f in range(13):
        for s in range(2):
            ys, xs = np.nonzero(clip.masks[f, s])
            assert len(xs) > 0
            x0, y0, x1, y1 = clip.boxes[f, s]
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    # the subjects look different: their mean colours are far apart
    c1 = clip.frames[clip.masks[:, 0] > 0].mean(0)
    c2 = clip.frames[clip.masks[:, 1] > 0].mean(0)
    assert np.abs(c1 - c2).max() > 40


def test_clips_are_deterministic_and_vary_per_index():
    a, b = render_clip("pushing", 1), render_clip("pushing", 1)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks)
    c = render_clip("pushing", 2)
    assert not np.array_equal(a.frames, c.frames)
    assert render_clip("pushing", 1, seed=1).frames.tobytes() != a.frames.tobytes()


def _features(clip) -> np.ndarray:
    """Normalised boxes over time, left/right canonicalised with the clip's ground truth."""
    f, h, w = clip.frames.shape[:3]
    boxes = clip.boxes.astype(np.float64) / np.array([w, h, w, h])
    if clip.mirrored:
        boxes[..., [0, 2]] = 1.0 - boxes[..., [2, 0]]
    return boxes.reshape(-1)


def test_the_26_relations_are_recognisable_from_the_subjects_boxes():
    """Nearest-centroid on box trajectories: centroids from 4 clips per relation, judged on 4 other clips."""
    names = sorted(PATTERNS)
    centroids = np.stack([np.mean([_features(render_clip(n, i, 19, 64, 96)) for i in range(4)], axis=0)
                          for n in names])
    d = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1) + np.eye(len(names)) * 1e9
    assert d.min() > 0.4, "two relation patterns are nearly the same"
    correct = 0
    for k, n in enumerate(names):
        for i in range(4, 8):
            pred = np.argmin(np.linalg.norm(centroids - _features(render_clip(n, i, 19, 64, 96)), axis=1))
            correct += int(pred == k)
    assert correct / (4 * len(names)) >= 0.95


def test_written_clips_carry_video_masks_and_truth(tmp_path):
    write_synthetic_videos(tmp_path, ["hugging"], 2, 7, 32, 48)
    folder = tmp_path / "hugging"
    assert sorted(p.name for p in folder.iterdir()) == [
        "hugging_0000.json", "hugging_0000.mp4", "hugging_0000_masks",
        "hugging_0001.json", "hugging_0001.mp4", "hugging_0001_masks"]
    truth = json.loads((folder / "hugging_0001.json").read_text())
    clip = render_clip("hugging", 1, 7, 32, 48)
    assert truth["relation"] == "hugging" and np.allclose(truth["boxes_xyxy"], clip.boxes, atol=0.01)
    assert np.array_equal(load_mask_folder(folder / "hugging_0001_masks").masks, clip.masks)
    with pytest.raises(ValueError, match=">= 1"):
        write_synthetic_videos(tmp_path, ["hugging"], 0, 7, 32, 48)


def test_the_dataset_cache_is_rendered_again_when_a_pattern_changes(tmp_path, monkeypatch):
    """Clips cached before a relation was redrawn must not be reused: the cache folder's key holds the patterns."""
    from conftest import small_config
    from dr_train.data.sources import synthetic_dataset_dir

    cfg = small_config(tmp_path)
    before = synthetic_dataset_dir(cfg)
    assert synthetic_dataset_dir(small_config(tmp_path)) == before
    monkeypatch.setitem(PATTERNS, "high_five", {**PATTERNS["high_five"], "x1": 0.3})
    assert synthetic_dataset_dir(cfg) != before


def test_the_dataset_cache_grows_by_the_relations_a_run_adds_without_warning_about_the_others(tmp_path, caplog):
    from conftest import small_config
    from dr_train.data.shards import load_manifest
    from dr_train.data.sources import resolve_dataset

    cfg = small_config(tmp_path, **{"data.cache_dir": str(tmp_path / "cache"), "data.videos_per_relation": 2})
    catalog = load_catalog()
    root = resolve_dataset(cfg, [catalog["hugging"]])
    first = load_manifest(root)["shards"]
    with caplog.at_level("WARNING", logger="dr_train"):
        assert resolve_dataset(cfg, [catalog["kicking"]]) == root
    manifest = load_manifest(root)
    assert {r: v["samples"] for r, v in manifest["relations"].items()} == {"hugging": 2, "kicking": 2}
    assert [s for s in manifest["shards"] if s["relation"] == "hugging"] == first      # kept, not rebuilt
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_the_dataset_cache_is_rendered_again_when_the_worlds_looks_change(tmp_path, monkeypatch):
    """The synth preset's exemplars come from the world renderer: a thicker arm is another clip, another cache."""
    from conftest import small_config
    from dr_train.data import world
    from dr_train.data.sources import synthetic_dataset_dir

    cfg = small_config(tmp_path, **{"model.preset": "synth"})
    before = synthetic_dataset_dir(cfg)
    monkeypatch.setattr(world, "_ARM_THICKNESS", world._ARM_THICKNESS * 1.5)
    assert synthetic_dataset_dir(cfg) != before
    monkeypatch.undo()
    assert synthetic_dataset_dir(cfg) == before
