import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_run, small_config
from dr_train.losses import masked_flow_matching_loss, noisy_latents
from dr_train.trainer import NonFiniteLossError, RelationRun, train


def _metrics(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_loss_goes_down_on_a_tiny_overfit_case(tmp_path):
    """One clip, fixed evaluation draws of (noise, sigma): the trained triplet predicts the velocity better."""
    cfg = small_config(tmp_path, **{"data.videos_per_relation": 1, "data.caption_dropout": 0.0, "optim.lr": 1e-2,
                                    "loss.rcl_weight": 0.0, "hmt.enabled": False, "optim.max_grad_norm": 0,
                                    "optim.warmup_steps": 0, "optim.schedule": "constant"})
    run = make_run(cfg, "hugging", tmp_path)
    g = torch.Generator().manual_seed(123)
    clip = run.stream.next_batch()           # the relation's only clip
    z0 = clip.latents_mean.repeat(64, 1, 1, 1, 1)
    text, text_mask = clip.text_embed.repeat(64, 1, 1), clip.text_mask.repeat(64, 1)
    eps, sigma = torch.randn(z0.shape, generator=g), torch.rand(64, generator=g)

    def eval_loss():
        with torch.no_grad():
            z, target, t = noisy_latents(z0, eps, sigma)
            pred = run.transformer(hidden_states=z, encoder_hidden_states=text, timestep=t,
                                   encoder_attention_mask=text_mask, return_dict=False)[0]
            return masked_flow_matching_loss(pred, target, torch.zeros(64, *z0.shape[2:]), 0.0).item()

    before = eval_loss()
    losses = [run.train_step()["loss_rec"] for _ in range(300)]
    after = eval_loss()
    run.close()
    assert after < 0.95 * before, (before, after)
    assert sum(losses[-50:]) < sum(losses[:50])


def test_metrics_record_every_step(tmp_path):
    cfg = small_config(tmp_path, **{"train.relations": "handshaking"})
    train(cfg)
    out = tmp_path / "runs" / "handshaking"
    rows = _metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert r["selection"] in ("relation", "subject1", "subject2")
        assert set(r) >= {"loss", "loss_rec", "loss_rcl", "lr", "seconds", "adapters_updated"}
    # the bank needs n_pos=4 other videos before the contrastive term runs; skipped steps say why
    assert rows[0]["loss_rcl"] is None and "positives" in rows[0]["rcl_skipped"]
    assert rows[-1]["loss_rcl"] is not None and rows[-1]["rcl_skipped"] is None
    assert rows[2]["lr"] < rows[-2]["lr"] or rows[0]["lr"] < rows[2]["lr"]        # warmup, then cosine
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "DONE.json").is_file() and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert any((out / "tensorboard").iterdir())


OFFICIAL = {"loss.mode": "official", "loss.rcl_variant": "official", "optim.frozen_adapters": "zero_grad",
            "loss.bank_size": 3, "loss.n_pos": 2, "loss.negative_bank_frames": 5}


@pytest.mark.parametrize("method", ["paper", "official"])
def test_resume_is_bit_exact(tmp_path, method):
    over = {"train.relations": "high_five", "train.deterministic": True, "data.caption_dropout": 0.3,
            **(OFFICIAL if method == "official" else {})}
    straight = small_config(tmp_path / "a", **over)
    train(straight)

    resumed = small_config(tmp_path / "b", **over)
    original = RelationRun.train_step

    def crash_after_four(self):
        if self.step == 5:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    RelationRun.train_step = crash_after_four
    try:
        with pytest.raises(KeyboardInterrupt):
            train(resumed)
    finally:
        RelationRun.train_step = original
    partial = _metrics(tmp_path / "b" / "runs" / "high_five" / "metrics.jsonl")
    assert [r["step"] for r in partial] == [1, 2, 3, 4, 5]                      # step 5 ran after checkpoint 4
    with (tmp_path / "b" / "runs" / "high_five" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "selec')                                          # a line torn by the crash
    resumed.train.resume = True
    train(resumed)

    a = _metrics(tmp_path / "a" / "runs" / "high_five" / "metrics.jsonl")
    b = _metrics(tmp_path / "b" / "runs" / "high_five" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))                          # no step lost or counted twice
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_rec", "loss_rcl", "selection", "lr", "videos"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa = load_file(str(tmp_path / "a/runs/high_five/checkpoints/step-00000008/adapters.safetensors"))
    wb = load_file(str(tmp_path / "b/runs/high_five/checkpoints/step-00000008/adapters.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _train_and_get_checkpoint(tmp_path):
    cfg = small_config(tmp_path, **{"train.relations": "kicking", "train.max_steps": 4})
    train(cfg)
    return cfg, tmp_path / "runs" / "kicking" / "checkpoints" / "step-00000004"


def _resume_from(cfg, ckpt):
    run = make_run(cfg, "kicking", ckpt.parent.parent)
    try:
        run.resume(ckpt)
    finally:
        run.close()


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    cfg, ckpt = _train_and_get_checkpoint(tmp_path)
    f = ckpt / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="optimizer.safetensors is truncated"):
        _resume_from(cfg, ckpt)


def test_flipped_byte_and_missing_manifest_are_refused(tmp_path):
    cfg, ckpt = _train_and_get_checkpoint(tmp_path)
    f = ckpt / "adapters.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="adapters.safetensors is corrupt"):
        _resume_from(cfg, ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        _resume_from(cfg, ckpt)


def test_mismatched_checkpoint_is_refused(tmp_path):
    cfg, ckpt = _train_and_get_checkpoint(tmp_path)
    cfg.lora.placement = "relation_v"
    with pytest.raises(ValueError, match="state.json was written for"):
        _resume_from(cfg, ckpt)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    cfg = small_config(tmp_path, **{"train.relations": "pushing"})
    original = RelationRun.micro_step

    def poisoned(self, batch, selection, band):
        if self.step == 5:
            batch = dataclasses.replace(batch, latents_mean=batch.latents_mean * float("nan"))
        return original(self, batch, selection, band)

    RelationRun.micro_step = poisoned
    try:
        with pytest.raises(NonFiniteLossError, match=r"pushing, step 6: loss is nan.*pushing__pushing_\d+.*step-00000004"):
            train(cfg)
    finally:
        RelationRun.micro_step = original
    out = tmp_path / "runs" / "pushing"
    assert (out / "checkpoints" / "step-00000004" / "manifest.json").is_file()
    assert not (out / "DONE.json").exists()


def test_existing_run_needs_resume_and_finished_relations_are_skipped(tmp_path):
    cfg = small_config(tmp_path, **{"train.relations": "hugging", "train.max_steps": 2})
    train(cfg)
    again = train(cfg)
    assert again[0]["status"].startswith("skipped")
    (tmp_path / "runs" / "hugging" / "DONE.json").unlink()
    with pytest.raises(ValueError, match="pass --resume"):
        train(cfg)


def test_accumulation_batches_and_bf16_autocast(tmp_path):
    cfg = small_config(tmp_path, **{"train.grad_accum": 2, "train.batch_size": 2, "train.mixed_precision": "bf16",
                                    "train.max_steps": 3, "train.relations": "following"})
    run = make_run(cfg, "following", tmp_path / "r")
    try:
        records = [run.train_step() for _ in range(3)]
    finally:
        run.close()
    assert all(len(r["videos"]) == 4 and torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert len({v for r in records for v in r["videos"]}) == 6          # one epoch of 6 clips, then a new one


def test_resume_without_any_checkpoint_restarts_cleanly(tmp_path):
    cfg = small_config(tmp_path, **{"train.relations": "hugging", "train.max_steps": 3, "train.resume": True})
    out = tmp_path / "runs" / "hugging"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')          # a crash before the first checkpoint
    train(cfg)
    assert [r["step"] for r in _metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_triton_kernels_in_the_trainer_match_the_torch_path(tmp_path, monkeypatch):
    """The trainer's losses through the fused kernels (Triton interpreter on CPU) equal the torch references."""
    import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels.dispatch, "_override", None)      # restored afterwards: other tests see auto
    losses = {}
    for backend in ("torch", "triton"):
        cfg = small_config(tmp_path / backend, **{"train.kernels": backend, "loss.bank_size": 4, "loss.n_pos": 1,
                                                  "loss.n_neg": 2})
        run = make_run(cfg, "hugging", tmp_path / backend / "r")
        losses[backend] = [(r["loss_rec"], r["loss_rcl"]) for r in (run.train_step() for _ in range(5))]
        run.close()
    assert any(rcl is not None for _, rcl in losses["torch"])
    for (rec_t, rcl_t), (rec_k, rcl_k) in zip(losses["torch"], losses["triton"]):
        assert rec_k == pytest.approx(rec_t, rel=1e-5)
        assert (rcl_t is None and rcl_k is None) or rcl_k == pytest.approx(rcl_t, rel=1e-4)


def test_official_mode_weights_the_loss_with_max_pooled_masks_and_runs_the_official_contrastive_term(tmp_path,
                                                                                                     monkeypatch):
    import kernels

    cfg = small_config(tmp_path, **{"train.relations": "hugging", **OFFICIAL})
    run = make_run(cfg, "hugging", tmp_path / "r")
    seen = {}
    real_loss, real_next = kernels.masked_flow_matching_loss, run.next_batch

    def loss(pred, target, mask, weight, mode):
        seen["mask"], seen["mode"] = mask.detach().clone(), mode
        return real_loss(pred, target, mask, weight, mode)

    def next_batch():
        seen["batch"] = real_next()
        return seen["batch"]

    monkeypatch.setattr(kernels, "masked_flow_matching_loss", loss)
    run.next_batch = next_batch
    run.hmt.draw = lambda: "relation"
    try:
        records = [run.train_step() for _ in range(3)]
    finally:
        run.close()
    b = seen["batch"]
    assert seen["mode"] == "official"
    assert torch.equal(seen["mask"], b.mask_subject1_maxpool + b.mask_subject2_maxpool)
    assert not torch.equal(b.mask_subject1_maxpool, b.mask_subject1)
    assert records[0]["loss_rcl"] is None and "holds no clip" in records[0]["rcl_skipped"]
    assert all(r["loss_rcl"] is not None for r in records[1:])          # used as soon as one clip is held


def test_extending_a_finished_run_equals_training_straight(tmp_path, caplog):
    """--max-steps 2, then --resume --max-steps 4 (killed at step 3, resumed): the same steps and weights as 4
    straight, with optim.schedule_steps fixing the LR horizon."""
    over = {"train.relations": "high_five", "train.deterministic": True, "optim.schedule_steps": 4,
            "train.checkpoint_every": 1}
    straight = small_config(tmp_path / "a", **over, **{"train.max_steps": 4})
    train(straight)

    short = small_config(tmp_path / "b", **over, **{"train.max_steps": 2})
    train(short)
    out = tmp_path / "b" / "runs" / "high_five"
    assert json.loads((out / "DONE.json").read_text())["steps"] == 2
    longer = small_config(tmp_path / "b", **over, **{"train.max_steps": 4})
    skipped = train(longer)                                              # without --resume: skipped, told why
    assert "--resume extends it" in skipped[0]["status"]
    longer.train.resume = True
    original = RelationRun.train_step

    def crash_at_four(self):
        if self.step == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    RelationRun.train_step = crash_at_four
    try:
        with caplog.at_level("INFO", logger="dr_train"), pytest.raises(KeyboardInterrupt):
            train(longer)
    finally:
        RelationRun.train_step = original
    assert "extending from step 2 to 4" in caplog.text
    assert not (out / "DONE.json").exists()                              # unfinished again until step 4
    train(longer)
    a = _metrics(tmp_path / "a" / "runs" / "high_five" / "metrics.jsonl")
    b = _metrics(out / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_rec", "loss_rcl", "selection", "lr", "videos"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa = load_file(str(tmp_path / "a/runs/high_five/checkpoints/step-00000004/adapters.safetensors"))
    wb = load_file(str(out / "checkpoints/step-00000004/adapters.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((out / "DONE.json").read_text())["steps"] == 4
    assert train(longer)[0]["status"].startswith("skipped (finished at 4 steps)")


def test_validation_leaves_training_untouched_and_writes_videos(tmp_path, caplog):
    """Validation every 2 steps (inference adapters, 2 sampler steps): the same losses and weights as without it,
    its videos and index on disk, its scalars in metrics.jsonl, and the skipped-RCL message once per relation."""
    over = {"train.relations": "hugging", "train.deterministic": True, "train.max_steps": 4,
            "validation.num_inference_steps": 2, "validation.seeds": [0, 1]}
    train(small_config(tmp_path / "off", **over, **{"validation.every": 0}))
    with caplog.at_level("INFO", logger="dr_train"):
        train(small_config(tmp_path / "on", **over, **{"validation.every": 2}))
    off = _metrics(tmp_path / "off" / "runs" / "hugging" / "metrics.jsonl")
    on = _metrics(tmp_path / "on" / "runs" / "hugging" / "metrics.jsonl")
    for a, b in zip(off, on):
        for key in ("loss", "loss_rec", "loss_rcl", "selection", "lr", "videos", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)
    wa = load_file(str(tmp_path / "off/runs/hugging/checkpoints/step-00000004/adapters.safetensors"))
    wb = load_file(str(tmp_path / "on/runs/hugging/checkpoints/step-00000004/adapters.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in on if "validation_seconds" in r] == [2, 4]
    assert all(r["validation_videos"] == 6 for r in on if "validation_seconds" in r)    # 3 prompts x 2 seeds
    folder = tmp_path / "on" / "runs" / "hugging" / "validation" / "step-00000004"
    index = json.loads((folder / "index.json").read_text())
    assert [(v["index"], v["seed"]) for v in index["videos"]] == [(i, s) for i in range(3) for s in (0, 1)]
    assert all((folder / f"{i:02d}_s{s}" / "video.mp4").is_file() for i in range(3) for s in (0, 1))
    assert index["videos"][0]["prompt"] == "A person is hugging a person."
    assert caplog.text.count("relational contrastive loss skipped") == 1
    assert "validation took" in caplog.text


def test_wandb_offline_run_gets_scalars_and_validation_but_never_the_key(tmp_path, monkeypatch):
    import wandb

    secret = "drtrain0secret0key0for0the0test0only0000"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    logged = []
    original = wandb.Run.log
    monkeypatch.setattr(wandb.Run, "log", lambda self, data, *a, **k: (logged.append((k.get("step"), dict(data))),
                                                                          original(self, data, *a, **k))[1])
    cfg = small_config(tmp_path, **{"train.relations": "hugging", "train.max_steps": 2, "log.wandb": True,
                                    "log.wandb_mode": "offline", "validation.every": 2,
                                    "validation.num_inference_steps": 2})
    train(cfg)
    out = tmp_path / "runs" / "hugging"
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    steps = {step for step, _ in logged}
    assert steps == {1, 2}
    keys = {k for _, data in logged for k in data}
    assert {"loss", "loss_rec", "lr", "validation_seconds"} <= keys
    assert any(k.startswith("hugging/validation/") and k.endswith("_video") for k in keys)
    assert b"validation_seconds" in runs[0].read_bytes()                 # written by W&B itself, offline
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# high_five's keyframes when tests/golden/checkpoint_v1 was made (it was redrawn later): the clips that run trained on
HIGH_FIVE_V1 = {"x1": [(0, .25), (.4, .38), (1, .38)], "x2": [(0, .75), (.4, .62), (1, .62)],
                "arm1": [(0, 0), (.4, 0), (.6, 1), (.7, 1), (.85, 0), (1, 0)],
                "arm2": [(0, 0), (.4, 0), (.6, 1), (.7, 1), (.85, 0), (1, 0)],
                "ah1": [(0, 0), (.4, -.5), (.6, -1.8), (.85, -1.8), (1, 0)],
                "ah2": [(0, 0), (.4, -.5), (.6, -1.8), (.85, -1.8), (1, 0)]}


def test_a_checkpoint_written_by_the_earlier_layout_resumes_to_the_same_losses(tmp_path, monkeypatch):
    """tests/golden/checkpoint_v1: step 4 of a run written before the trainer's checkpoint parts moved into
    CheckpointManager; resuming it now gives the steps 5-8 that run logged (same format, same state restored)."""
    import shutil
    from pathlib import Path

    from dr_train.data import synthetic

    monkeypatch.setitem(synthetic.PATTERNS, "high_five", HIGH_FIVE_V1)     # the cache key follows the patterns
    golden = Path(__file__).parent / "golden" / "checkpoint_v1"
    expected = json.loads((golden / "expected.json").read_text())["metrics"]
    cfg = small_config(tmp_path, **{"train.relations": "high_five", "train.deterministic": True,
                                    "data.caption_dropout": 0.3, "train.resume": True})
    run_dir = tmp_path / "runs" / "high_five"
    shutil.copytree(golden / "step-00000004", run_dir / "checkpoints" / "step-00000004")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expected[:4]))
    train(cfg)
    got = _metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    for want, row in zip(expected[4:], got[4:]):
        assert row["selection"] == want["selection"] and row["videos"] == want["videos"], row["step"]
        for key in ("loss", "loss_rec", "lr"):
            assert row[key] == pytest.approx(want[key], rel=1e-5), (row["step"], key)
        assert (row["loss_rcl"] is None) == (want["loss_rcl"] is None)
        if want["loss_rcl"] is not None:        # 0.0035 at step 5: another CPU's summation order moved it by
            # 2.4e-7 there (rel 7e-5), so an absolute floor of 1e-6 beside the relative 1e-5
            assert row["loss_rcl"] == pytest.approx(want["loss_rcl"], rel=1e-5, abs=1e-6), row["step"]


def test_a_relation_made_on_another_base_is_neither_reused_nor_resumed(tmp_path, monkeypatch, caplog):
    """A base retrained under the same preset name (as the synth base is): its finished relations are refused,
    not skipped as done, and its checkpoints are not resumed. A DONE.json from before bases were recorded is
    skipped as before."""
    cfg = small_config(tmp_path, **{"train.relations": "hugging", "train.max_steps": 2, "train.checkpoint_every": 1})
    train(cfg)
    out = tmp_path / "runs" / "hugging"
    assert json.loads((out / "DONE.json").read_text())["base"] == "tiny"
    state = json.loads((out / "checkpoints" / "step-00000001" / "state.json").read_text())
    assert state["identity"]["base"] == "tiny"
    monkeypatch.setattr("dr_train.trainer.base_identity", lambda preset: "tiny-retrained")
    monkeypatch.setattr("dr_train.model.loading.base_identity", lambda preset: "tiny-retrained")
    with pytest.raises(ValueError, match=r"hugging/DONE.json was made on base tiny, but model.preset 'tiny' is base "
                                         r"tiny-retrained.*remove .*hugging to train it again"):
        train(cfg)
    assert (out / "DONE.json").is_file() and (out / "lora").is_dir()           # nothing removed
    done = json.loads((out / "DONE.json").read_text())
    (out / "DONE.json").write_text(json.dumps({k: v for k, v in done.items() if k != "base"}))
    assert train(cfg)[0]["status"].startswith("skipped")
    (out / "DONE.json").unlink()
    resumed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
    with pytest.raises(ValueError, match=r"step-00000002.*was written for .*'base': 'tiny'.*tiny-retrained"):
        train(resumed)
