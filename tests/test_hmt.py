import pytest
import torch

from conftest import make_run, small_config
from dr_train.catalog import load_catalog
from dr_train.hmt import HybridMaskTraining


def _snapshot(run):
    by_adapter = {}
    for adapter, params in run.params_by_adapter.items():
        by_adapter[adapter] = {
            "w": [p.detach().clone() for p in params],
            "opt": [{k: v.clone() for k, v in run.optimizer.state.get(p, {}).items()} for p in params],
        }
    return by_adapter


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a["w"], b["w"])) and all(
        set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a["opt"], b["opt"]))


def _run(tmp_path, **kw):
    cfg = small_config(tmp_path, **kw)
    relation = load_catalog()["handshaking"]
    return make_run(cfg, relation.name, tmp_path / "r")


def _force(run, selection):
    run.hmt.draw = lambda: selection


def test_subject_step_leaves_other_adapters_bit_identical(tmp_path):
    run = _run(tmp_path)
    for sel in ("relation", "relation"):          # give every adapter weights and AdamW moments first
        _force(run, sel)
        run.train_step()
    before = _snapshot(run)
    _force(run, "subject1")
    record = run.train_step()
    after = _snapshot(run)
    assert record["adapters_updated"] == ["subject1", "ffn"]
    assert _same(before["relation"], after["relation"])
    assert _same(before["subject2"], after["subject2"])
    assert not _same(before["subject1"], after["subject1"])
    assert not _same(before["ffn"], after["ffn"])


def test_relation_step_changes_all_four(tmp_path):
    run = _run(tmp_path)
    before = _snapshot(run)
    _force(run, "relation")
    assert run.train_step()["adapters_updated"] == ["relation", "subject1", "subject2", "ffn"]
    after = _snapshot(run)
    assert all(not _same(before[a], after[a]) for a in ("relation", "subject1", "subject2", "ffn"))


def test_frozen_subjects_run_in_a_relation_step_but_only_relation_and_ffn_change(tmp_path):
    run = _run(tmp_path / "run", **{"data.caption_dropout": 0.0, "hmt.relation_step_subjects": "frozen"})
    try:
        _nonzero_adapters(run)
        before = _snapshot(run)
        weights, kwargs, out = _captured_step(run, "relation")
        after = _snapshot(run)
        updated = [g["adapter"] for g in run.optimizer.param_groups if g["active"]]
    finally:
        run.close()
    with torch.no_grad():
        expected = _with_only(weights, ["relation", "subject1", "subject2", "ffn"])(**kwargs)[0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)     # the subjects' cues are in the step
    assert updated == ["relation", "ffn"]
    assert _same(before["subject1"], after["subject1"]) and _same(before["subject2"], after["subject2"])
    assert not _same(before["relation"], after["relation"]) and not _same(before["ffn"], after["ffn"])
    hmt = HybridMaskTraining(["relation", "subject1", "subject2", "ffn"], relation_step_subjects="frozen")
    assert hmt.adapters_to_update("subject2") == ["subject2", "ffn"] == hmt.adapters_to_run("subject2")
    excluded = HybridMaskTraining(["relation", "subject1", "subject2", "ffn"], relation_step_subjects="excluded")
    assert excluded.adapters_to_run("relation") == ["relation", "ffn"] == excluded.adapters_to_update("relation")
    assert excluded.adapters_to_run("subject1") == ["subject1", "ffn"] == excluded.adapters_to_update("subject1")
    with pytest.raises(ValueError,
                       match="hmt.relation_step_subjects must be one of train, frozen, excluded, got 'none'"):
        HybridMaskTraining(["relation"], relation_step_subjects="none")


def test_disabled_hmt_updates_everything_with_the_relation_mask(tmp_path):
    run = _run(tmp_path, **{"hmt.enabled": False})
    assert run.train_step()["selection"] == "all"
    assert run.hmt.adapters_to_update("all") == ["relation", "subject1", "subject2", "ffn"]


def test_draws_follow_probabilities_and_seed():
    h = HybridMaskTraining(["relation", "subject1", "subject2", "ffn"], (0.5, 0.25, 0.25), seed=3)
    draws = [h.draw() for _ in range(4000)]
    assert abs(draws.count("relation") / 4000 - 0.5) < 0.03
    assert abs(draws.count("subject2") / 4000 - 0.25) < 0.03
    h2 = HybridMaskTraining(["relation", "subject1", "subject2", "ffn"], (0.5, 0.25, 0.25), seed=3)
    assert [h2.draw() for _ in range(4000)] == draws


def test_selections_that_update_nothing_are_never_drawn():
    h = HybridMaskTraining(["relation"], seed=0)        # no subject adapters, no ffn
    assert {h.draw() for _ in range(200)} == {"relation"}


def test_loss_mask_follows_selection():
    m1 = torch.tensor([0.2, 0.9, 0.0])
    m2 = torch.tensor([0.5, 0.3, 0.0])
    assert torch.equal(HybridMaskTraining.loss_mask("relation", m1, m2), torch.tensor([0.5, 0.9, 0.0]))
    assert torch.allclose(HybridMaskTraining.loss_mask("relation", m1, m2, "official"), m1 + m2)
    assert torch.equal(HybridMaskTraining.loss_mask("subject1", m1, m2), m1)
    assert torch.equal(HybridMaskTraining.loss_mask("subject2", m1, m2), m2)


def test_active_adapters_follow_the_selection_and_the_placement():
    from dr_train.hmt import active_adapters

    four = ["relation", "subject1", "subject2", "ffn"]
    assert active_adapters("relation", four) == four
    assert active_adapters("subject1", four) == ["subject1", "ffn"]
    assert active_adapters("subject2", four) == ["subject2", "ffn"]
    assert active_adapters("all", four) == four
    assert active_adapters("relation", ["relation", "ffn"]) == ["relation", "ffn"]            # w/o subject LoRAs
    assert active_adapters("subject2", ["relation", "subject1", "subject2"]) == ["subject2"]  # w/o FFN LoRAs
    assert active_adapters("relation", ["subject1", "subject2", "ffn"]) == ["subject1", "subject2", "ffn"]
    import pytest
    with pytest.raises(ValueError, match="unknown HMT selection 'subject3'"):
        active_adapters("subject3", four)


def _nonzero_adapters(run, seed=0):
    """Random lora_B (they start at zero), so every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in run.transformer.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _captured_step(run, selection):
    """Run one training step with `selection`; returns (a copy of the model before the step, the forward's inputs,
    its output)."""
    import copy

    before = copy.deepcopy(run.transformer)
    seen = {}

    def hook(module, args, kwargs, output):
        seen["kwargs"] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        seen["out"] = output[0].detach().clone()

    handle = run.transformer.register_forward_hook(hook, with_kwargs=True)
    _force(run, selection)
    try:
        run.train_step()
    finally:
        handle.remove()
    return before, seen["kwargs"], seen["out"]


def _with_only(model, adapters):
    """The output of `model` keeping only `adapters` (the others deleted with PEFT's own API)."""
    others = [a for a in ("relation", "subject1", "subject2", "ffn") if a not in adapters]
    if others:
        model.delete_adapters(others)
    model.set_adapters(list(adapters))
    return model


def test_subject_step_runs_only_its_subject_and_ffn(tmp_path):
    run = _run(tmp_path, **{"data.caption_dropout": 0.0})
    try:
        _nonzero_adapters(run)
        before, kwargs, out = _captured_step(run, "subject1")
    finally:
        run.close()
    import copy
    with torch.no_grad():
        expected = _with_only(copy.deepcopy(before), ["subject1", "ffn"])(**kwargs)[0]
        everything = _with_only(before, ["relation", "subject1", "subject2", "ffn"])(**kwargs)[0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert (out - everything).abs().max() > 1e-3          # relation and subject2 would have changed it


def test_relation_step_runs_all_four_and_forward_all_runs_all_four_in_subject_steps(tmp_path):
    for forward, selection in (("selected", "relation"), ("all", "subject2")):
        run = _run(tmp_path / forward, **{"data.caption_dropout": 0.0, "hmt.forward": forward})
        try:
            _nonzero_adapters(run)
            before, kwargs, out = _captured_step(run, selection)
            updated = run.optimizer.param_groups
        finally:
            run.close()
        with torch.no_grad():
            expected = _with_only(before, ["relation", "subject1", "subject2", "ffn"])(**kwargs)[0]
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        assert [g["adapter"] for g in updated if g["active"]] == (
            ["relation", "subject1", "subject2", "ffn"] if selection == "relation" else ["subject2", "ffn"])


def test_zero_grad_mode_moves_and_decays_frozen_adapters_as_adamw_with_zero_gradients(tmp_path):
    """optim.frozen_adapters=zero_grad (official): a subject1 step still steps relation with a zero gradient:
    w <- w (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), moments decayed, step count + 1."""
    run = _run(tmp_path, **{"optim.frozen_adapters": "zero_grad"})
    try:
        _force(run, "relation")
        run.train_step()
        p = run.params_by_adapter["relation"][0]
        w0, st = p.detach().clone(), {k: v.clone() for k, v in run.optimizer.state[p].items()}
        lr = run.optimizer.param_groups[0]["lr"]
        record = (_force(run, "subject1"), run.train_step())[1]
        group = run.optimizer.param_groups[0]
        b1, b2 = group["betas"]
        m, v, t = st["exp_avg"] * b1, st["exp_avg_sq"] * b2, float(st["step"]) + 1
        expected = w0 * (1 - lr * group["weight_decay"]) - lr * (m / (1 - b1 ** t)) / (
            (v / (1 - b2 ** t)).sqrt() + group["eps"])
        assert record["adapters_updated"] == ["subject1", "ffn"]
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=1e-5)
        assert float(run.optimizer.state[p]["step"]) == t
        assert not torch.equal(p.detach(), w0)
    finally:
        run.close()


def test_subject_frame_target_takes_each_samples_frame_and_its_mask_repeated_or_alone():
    from dr_train.method.hybrid_mask_training import subject_frame_target

    z0 = torch.randn(2, 3, 5, 4, 6)
    mask = torch.rand(2, 5, 4, 6)
    frame = torch.tensor([1, 4])
    z_still, m_still = subject_frame_target(z0, mask, frame, repeat=True)
    _, m_still5 = subject_frame_target(z0, mask[:, None], frame, repeat=True)        # the (B, 1, F, H, W) layout
    z_one, m_one = subject_frame_target(z0, mask, frame, repeat=False)
    for b, f in enumerate(frame.tolist()):
        assert all(torch.equal(z_still[b, :, t], z0[b, :, f]) for t in range(5))
        assert all(torch.equal(m_still[b, t], mask[b, f]) for t in range(5))
        assert torch.equal(z_one[b, :, 0], z0[b, :, f]) and torch.equal(m_one[b, 0], mask[b, f])
    assert m_still5.shape == (2, 1, 5, 4, 6) and torch.equal(m_still5[:, 0], m_still)
    assert z_one.shape == (2, 3, 1, 4, 6) and m_one.shape == (2, 1, 4, 6)


def _spy_loss(monkeypatch):
    """Each training loss's (target, mask), in call order."""
    import kernels

    seen = []
    real = kernels.masked_flow_matching_loss

    def spy(pred, target, mask, *args):
        seen.append({"target": target.detach().clone(), "mask": mask.detach().clone()})
        return real(pred, target, mask, *args)

    monkeypatch.setattr(kernels, "masked_flow_matching_loss", spy)
    return seen


STILL = {"hmt.subject_target": "still", "hmt.relation_step_subjects": "frozen"}
FRAME = {"hmt.subject_target": "frame", "hmt.relation_step_subjects": "frozen"}


@pytest.mark.parametrize("selection,options,still,mask_static", [
    ("subject2", STILL, True, True), ("relation", STILL, False, False), ("subject1", FRAME, True, True),
    ("relation", FRAME, False, False),
    ("relation", {"loss.mask_span": "clip"}, False, True), ("subject1", {"loss.mask_span": "clip"}, False, True)])
def test_subject_frame_targets_and_the_clip_mask_span(tmp_path, monkeypatch, selection, options, still, mask_static):
    """hmt.subject_target=still: the clean latents a subject step learns (hidden_states + sigma * target, sigma =
    1 - t / 1000) and its mask are the same in every frame, RCL is skipped; frame: the same as a one-frame clip;
    a relation step keeps the clip and RCL. loss.mask_span=clip: every frame's mask is the max over the clip's
    frames, the latents stay the clip's."""
    run = _run(tmp_path, **options)
    seen = _spy_loss(monkeypatch)
    import dr_train.trainer as trainer
    rcl_calls = []
    real_rcl = trainer.global_relational_contrastive_loss
    monkeypatch.setattr(trainer, "global_relational_contrastive_loss",
                        lambda *a: rcl_calls.append(1) or real_rcl(*a))
    try:
        _, kwargs, _ = _captured_step(run, selection)
    finally:
        run.close()
    assert len(seen) == 1 and run.cfg.loss.rcl_weight > 0 and len(rcl_calls) == (0 if still else 1)
    sigma = 1.0 - kwargs["timestep"].float() / 1000.0
    z0 = kwargs["hidden_states"].float() + sigma.view(-1, 1, 1, 1, 1) * seen[0]["target"].float()
    mask = seen[0]["mask"].reshape(z0.shape[0], -1, *z0.shape[-3:])
    frames = z0.shape[2]
    z_static = all(torch.allclose(z0[:, :, t], z0[:, :, 0], atol=1e-5) for t in range(frames))
    m_static = all(torch.equal(mask[:, :, t], mask[:, :, 0]) for t in range(frames))
    assert (z_static, m_static, run.hmt.frame_step(selection)) == (still, mask_static, still)
    assert mask.amax() > 0 and (frames == 1) == (still and options is FRAME)
    with pytest.raises(ValueError, match="hmt.subject_target must be one of video, still, frame, got 'image'"):
        HybridMaskTraining(["relation"], subject_target="image")


def test_subject_sigma_max_bands_the_steps_that_run_subject_loras():
    four = ["relation", "subject1", "subject2", "ffn"]
    every = HybridMaskTraining(four, seed=3)
    state = every.generator.get_state()
    assert {every.noise_band(s) for s in ("relation", "subject1", "all")} == {(0.0, 1.0)}
    assert torch.equal(every.generator.get_state(), state)           # off: the selection stream is untouched
    hmt = HybridMaskTraining(four, seed=3, subject_sigma_max=0.25)
    assert hmt.noise_band("subject2") == hmt.noise_band("subject1") == (0.0, 0.25)
    bands = [hmt.noise_band("relation") for _ in range(4000)]
    assert set(bands) == {(0.0, 0.25), (0.25, 1.0)}
    assert abs(bands.count((0.0, 0.25)) / len(bands) - 0.25) < 0.03    # each sigma as likely as without bands
    high, low = (0.25, 1.0), (0.0, 0.25)
    assert hmt.adapters_to_run("relation", high) == ["relation", "ffn"] == hmt.adapters_to_update("relation", high)
    assert hmt.adapters_to_run("relation", low) == four == hmt.adapters_to_update("relation", low)
    assert HybridMaskTraining(four, forward="all", subject_sigma_max=0.5).adapters_to_run("all", (0.5, 1.0)) == [
        "relation", "ffn"]
    assert HybridMaskTraining(["relation", "ffn"], subject_sigma_max=0.25).noise_band("relation") == (0.0, 1.0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"hmt.subject_sigma_max must be in \\(0, 1\\], got {bad}"):
            HybridMaskTraining(four, subject_sigma_max=bad)


def test_subject_loras_act_only_in_the_steps_of_their_noise_band(tmp_path):
    """hmt.subject_sigma_max=0.5: a subject step's sigmas are <= 0.5; a relation step's are <= 0.5 exactly when it
    runs and updates the subject LoRAs, and in the other steps the subject LoRAs neither change the output nor move."""
    run = _run(tmp_path, **{"data.caption_dropout": 0.0, "hmt.subject_sigma_max": 0.5,
                            "hmt.probabilities": [0.5, 0.25, 0.25]})
    try:
        records = [run.train_step() for _ in range(12)]
        _nonzero_adapters(run)
        run.hmt.noise_band = lambda selection: (0.5, 1.0)
        before = _snapshot(run)
        weights, kwargs, out = _captured_step(run, "relation")
        after = _snapshot(run)
    finally:
        run.close()
    relation = [r for r in records if r["selection"] == "relation"]
    assert all(r["sigma"] <= 0.5 for r in records if r["selection"] != "relation")
    assert all((r["sigma"] <= 0.5) == ("subject1" in r["adapters_updated"]) for r in relation)
    assert {"subject1" in r["adapters_updated"] for r in relation} == {True, False}
    assert all(t <= 500.0 for t in kwargs["timestep"].tolist())           # t = (1 - sigma) * 1000, sigma >= 0.5
    with torch.no_grad():
        expected = _with_only(weights, ["relation", "ffn"])(**kwargs)[0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert _same(before["subject1"], after["subject1"]) and _same(before["subject2"], after["subject2"])
    assert not _same(before["relation"], after["relation"])
