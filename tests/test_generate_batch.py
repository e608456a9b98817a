"""Batch generation (dr_train/generate.py::generate_batch) on the tiny preset: layout, index, resuming, and the
same video for the same (relation, prompt, seed) whatever the order of generation.

The run is made without training: each relation's triplet gets random LoRA weights (seeded, so the LoRA visibly
changes the videos) and is exported exactly as training exports it."""
import json

import pytest
import torch

from dr_train.config import load_config
from dr_train.generate import BASE, INDEX, generate_batch, load_index, main, relation_prompts, run_relations
from dr_train.lora import add_relation_lora_triplet, export_inference_lora, lora_named_parameters
from dr_train.model.presets import tiny_transformer

RELATIONS = ("handshaking", "high_five")
SIZE = {"steps": 2, "num_frames": 7, "height": 32, "width": 48}


def make_fake_run(root, relations=RELATIONS):
    """A run folder as the trainer leaves it (config.json, DONE.json, lora/), with random adapter weights."""
    cfg = load_config(None, ["model.preset=tiny", f"train.output_dir={root}", f"data.cache_dir={root / 'cache'}"])
    for k, name in enumerate(relations):
        transformer = add_relation_lora_triplet(tiny_transformer(), cfg.lora)
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for _, p in lora_named_parameters(transformer).items():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        folder = root / name
        export_inference_lora(transformer, folder / "lora", cfg.lora.export_adapters, metadata={"relation": name})
        (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
        (folder / "DONE.json").write_text(json.dumps({"relation": name, "steps": 0, "status": "finished"}))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def first(run):
    """Two relations x 2 prompts x 2 seeds, with the base model: 16 videos."""
    return generate_batch(run, prompts="eval", num_prompts=2, seeds=[0, 1], include_base=True, progress=False,
                          **SIZE)


def _sha(index):
    return {(i["relation"], i["kind"], i["prompt"], i["seed"]): i["frames_sha256"] for i in index["items"]}


def test_layout_index_and_generation_json(run, first):
    out = run / "eval" / "videos"
    assert first["generated"] == 16 and first["skipped"] == 0 and first["videos"] == 16
    index = load_index(out)
    assert index == {k: v for k, v in first.items() if k not in ("generated", "skipped")}
    assert index["settings"] == {"steps": 2, "guidance_scale": 6.0, "num_frames": 7, "height": 32, "width": 48,
                                 "fps": 30}
    assert index["base_model"] == "tiny" and index["relations"] == list(RELATIONS) and index["include_base"]
    kinds = [i["kind"] for i in index["items"]]
    assert kinds.count("lora") == 8 and kinds.count("base") == 8
    for item in index["items"]:
        prefix = f"{BASE}/{item['relation']}" if item["kind"] == "base" else item["relation"]
        assert item["folder"] == f"{prefix}/{item['prompt_index']:02d}_s{item['seed']}"
        for key in ("video", "keyframes", "generation"):
            assert (out / item[key]).is_file(), item[key]
        meta = json.loads((out / item["generation"]).read_text())
        assert meta["prompt"] == item["prompt"] and meta["seed"] == item["seed"] and meta["frames"] == 7
        assert meta["request"]["steps"] == 2 and meta["request"]["guidance_scale"] == 6.0
        assert (meta["lora"] is None) == (item["kind"] == "base")
    catalog_prompts = [i["prompt"] for i in index["items"] if i["relation"] == "handshaking" and i["seed"] == 0
                       and i["kind"] == "lora"]
    from dr_train.catalog import load_catalog
    assert catalog_prompts == list(load_catalog()["handshaking"].eval_prompts[:2])
    assert not list(out.rglob("*.tmp-*"))


def test_second_call_generates_nothing_and_keeps_files(run, first):
    out = run / "eval" / "videos"
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("video.mp4")}
    again = generate_batch(run, prompts="eval", num_prompts=2, seeds=[0, 1], progress=False, **SIZE)
    assert again["generated"] == 0 and again["skipped"] == 16
    assert {p: p.stat().st_mtime_ns for p in out.rglob("video.mp4")} == mtimes
    assert _sha(again) == _sha(first)


def test_same_seed_same_video_whatever_the_order(run, first, tmp_path):
    other = generate_batch(run, relations=list(reversed(RELATIONS)), num_prompts=1, seeds=[1, 0],
                           include_base=False, out_dir=tmp_path / "reordered", progress=False, **SIZE)
    assert other["generated"] == 4
    want, got = _sha(first), _sha(other)
    assert got and all(want[key] == sha for key, sha in got.items())
    # the LoRA changes the video, and seeds and relations give different videos
    prompt = first["items"][0]["prompt"]
    assert want[("handshaking", "lora", prompt, 0)] != want[("handshaking", "base", prompt, 0)]
    assert want[("handshaking", "lora", prompt, 0)] != want[("handshaking", "lora", prompt, 1)]
    hf = [v for (r, k, _, s), v in want.items() if r == "high_five" and k == "lora" and s == 0]
    assert want[("handshaking", "lora", prompt, 0)] not in hf


def test_stale_and_half_written_items_are_redone(run, tmp_path):
    out = tmp_path / "videos"
    kwargs = dict(relations=["high_five"], num_prompts=1, include_base=False, out_dir=out, progress=False)
    generate_batch(run, **kwargs, **SIZE)
    item = out / "high_five" / "00_s0"
    (item / "generation.json").unlink()                          # killed before its metadata was written
    (out / "high_five" / ".00_s0.tmp-999").mkdir()               # a temporary folder of a killed process
    assert generate_batch(run, **kwargs, **SIZE)["generated"] == 1
    assert not list(out.rglob("*.tmp-*"))
    changed = generate_batch(run, **kwargs, **{**SIZE, "steps": 3})  # other settings: regenerated
    assert changed["generated"] == 1
    assert json.loads((item / "generation.json").read_text())["request"]["steps"] == 3


def test_user_errors_name_the_file(run, tmp_path):
    with pytest.raises(ValueError, match=r"hugging.*DONE.json is missing"):
        generate_batch(run, relations=["hugging"], progress=False, **SIZE)
    with pytest.raises(ValueError, match="does not exist"):
        run_relations(tmp_path / "nothing")
    with pytest.raises(ValueError, match="1 \\+ 6k"):
        generate_batch(run, num_prompts=1, progress=False, **{**SIZE, "num_frames": 8})
    from dr_train.catalog import load_catalog
    with pytest.raises(ValueError, match="'eval', 'train'"):
        relation_prompts(load_catalog()["handshaking"], "evaluation")
    assert relation_prompts(load_catalog()["handshaking"], "train") == [load_catalog()["handshaking"].prompt]


def test_cli_batch_mode(run, first, capsys):
    argv = ["--run", str(run), "--num-prompts", "2", "--seeds", "0,1", "--steps", "2", "--num-frames", "7",
            "--height", "32", "--width", "48"]
    assert main(argv) == 0
    assert "16 videos (0 generated, 16 already there)" in capsys.readouterr().out
    assert main(["--run", str(run), "--prompt", "x"]) == 2
    assert main(["--run", str(run / "missing")]) == 2
    assert (run / "eval" / "videos" / INDEX).is_file()


def test_a_retrained_base_redoes_base_videos_and_refuses_loras_made_on_the_old_one(tmp_path, monkeypatch, caplog):
    """A base retrained under the same preset name (as the synth base is): the base model's videos made on the old
    one are stale, and a LoRA whose DONE.json records the old base is refused unless the preset is named."""
    run = make_fake_run(tmp_path / "run", ("high_five",))
    done = run / "high_five" / "DONE.json"
    done.write_text(json.dumps(json.loads(done.read_text()) | {"base": "tiny"}))
    kwargs = dict(num_prompts=1, out_dir=tmp_path / "videos", progress=False)
    assert generate_batch(run, **kwargs, **SIZE)["generated"] == 2
    assert generate_batch(run, include_lora=False, **kwargs, **SIZE)["generated"] == 0
    monkeypatch.setattr("dr_train.generate.base_identity", lambda preset: "tiny-retrained")
    assert generate_batch(run, include_lora=False, **kwargs, **SIZE)["generated"] == 1
    with pytest.raises(ValueError, match=r"high_five/DONE.json was made on base tiny, but model.preset 'tiny' is "
                                         r"base tiny-retrained.*--output-dir"):
        generate_batch(run, **kwargs, **SIZE)
    with caplog.at_level("WARNING", logger="dr_train"):
        assert generate_batch(run, preset="tiny", **kwargs, **SIZE)["generated"] == 1
    assert "applying its LoRA anyway" in caplog.text
