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
