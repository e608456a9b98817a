import pytest

from conftest import REPO
from dr_train.catalog import load_catalog, select_relations
from dr_train.config import Config, dump_commented_yaml, load_config


def test_catalog_has_the_26_ntu_mutual_actions():
    cat = load_catalog()
    ids = [r.ntu_action for r in cat.values()]
    assert len(cat) == 26
    assert ids == [f"A{i}" for i in list(range(50, 61)) + list(range(106, 121))]
    assert cat["handshaking"].prompt == "A person is shaking hands with a person."
    assert all(len(r.eval_prompts) == 10 for r in cat.values())
    assert [r.name for r in select_relations("all", cat)] == list(cat)
    assert [r.name for r in select_relations("hugging, kicking", cat)] == ["hugging", "kicking"]
    with pytest.raises(ValueError, match="unknown relation"):
        select_relations("hugging,moonwalk", cat)


def test_user_catalog_with_own_relation(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("relations:\n  - {name: tango, prompt: A person is dancing tango with a person., videos: /data/t}\n")
    assert load_catalog(f)["tango"].videos == "/data/t"
    f.write_text("relations:\n  - {name: Bad Name, prompt: x}\n")
    with pytest.raises(ValueError, match="must match"):
        load_catalog(f)


def test_default_yaml_is_generated_from_the_dataclasses():
    assert (REPO / "configs" / "default.yaml").read_text() == dump_commented_yaml(Config())
    assert load_config(REPO / "configs" / "default.yaml") == Config()


def test_overrides_types_and_errors(tmp_path):
    cfg = load_config(None, ["lora.placement=relation_v", "train.max_steps=7", "train.relations=a,b",
                             "hmt.enabled=false", "loss.mask_weight=10"])
    assert (cfg.lora.placement, cfg.train.max_steps, cfg.train.relations) == ("relation_v", 7, ["a", "b"])
    assert cfg.hmt.enabled is False and cfg.loss.mask_weight == 10.0
    cfg = load_config(None, ["lora.placement={relation: [to_q], ffn: [to_out.0]}"])
    assert cfg.lora.placement == {"relation": ["to_q"], "ffn": ["to_out.0"]}
    for bad, msg in (["train.max_stepz=3", "unknown config option 'train.max_stepz'"],
                     ["train.max_steps=3.5", "expected an integer"], ["train.max_steps=0", ">= 1"],
                     ["hmt.probabilities=[1, 1]", "3 non-negative"], ["nodots", "section.option=value"]):
        with pytest.raises(ValueError, match=msg.replace("[", "\\[")):
            load_config(None, [bad])
    bad_yaml = tmp_path / "c.yaml"
    bad_yaml.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad_yaml)


@pytest.mark.parametrize("name", ["w_o_hmt", "w_o_rcl", "direct_lora"])
def test_ablation_configs_load(name):
    load_config(REPO / "configs" / "ablations" / f"{name}.yaml")


def test_official_and_paper_configs_set_their_readings():
    official = load_config(REPO / "configs" / "official.yaml")
    assert (official.loss.mode, official.loss.rcl_variant, official.optim.frozen_adapters, official.hmt.forward) == (
        "official", "official", "zero_grad", "selected")
    assert (official.optim.warmup_steps, official.optim.schedule_steps, official.optim.max_grad_norm) == (200, 3000, 0)
    assert (official.loss.n_pos, official.loss.bank_size, official.loss.negative_bank_frames) == (1, 10, 64)
    assert official.prepare.trim == "start"
    paper = load_config(REPO / "configs" / "paper.yaml")
    assert (paper.train.max_steps, paper.loss.n_pos, paper.loss.bank_size, paper.loss.rcl_variant) == (2400, 4, 64,
                                                                                                        "paper")


@pytest.mark.parametrize("option,value", [("hmt.forward", "some"), ("optim.frozen_adapters", "freeze"),
                                          ("loss.rcl_variant", "both"), ("optim.schedule_steps", "-1")])
def test_new_method_options_are_checked(option, value):
    with pytest.raises(ValueError, match=option.split(".")[1]):
        load_config(None, [f"{option}={value}"])


def test_pretrain_recipe_yaml_is_generated_from_its_dataclasses():
    from dr_train.config import dump_commented_yaml
    from dr_train.pretrain.config import HEADER, PretrainConfig, load_pretrain_config

    assert (REPO / "configs" / "pretrain_synth.yaml").read_text() == dump_commented_yaml(PretrainConfig(), HEADER)
    assert load_pretrain_config(REPO / "configs" / "pretrain_synth.yaml") == PretrainConfig()
    with pytest.raises(ValueError, match="vae.clip_frames"):
        load_pretrain_config(None, ["vae.clip_frames=12"])
    with pytest.raises(ValueError, match="unknown config option 'transformer.depth'"):
        load_pretrain_config(None, ["transformer.depth=3"])
