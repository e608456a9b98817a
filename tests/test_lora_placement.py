
import pytest
import torch

from dr_train.config import LoRAConfig
from dr_train.lora import PLACEMENTS, add_relation_lora_triplet, adapter_names, resolve_placement
from dr_train.model import tiny_transformer

PAPER = {
    "relation": {"to_q", "to_k", "add_q_proj", "add_k_proj"},
    "subject1": {"to_v", "add_v_proj"},
    "subject2": {"to_v", "add_v_proj"},
    "ffn": {"to_out.0", "to_add_out"},
}


def _placement_by_module(transformer):
    """{module name: set of adapters} read from the model's LoRA layers."""
    found = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and len(module.lora_A):
            found[name] = set(module.lora_A.keys())
    return found


def _expected(placement):
    t = tiny_transformer()
    expected = {}
    for i, block in enumerate(t.transformer_blocks):
        for adapter, projs in placement.items():
            for proj in projs:
                prefix = f"transformer_blocks.{i}." + ("attn1." if not proj.startswith("ff") else "")
                name = prefix + proj
                if name in dict(t.named_modules()):
                    expected.setdefault(name, set()).add(adapter)
    return expected


def test_paper_triplet_module_by_module_on_both_streams():
    t = add_relation_lora_triplet(tiny_transformer())
    got = _placement_by_module(t)
    assert adapter_names(t) == ["relation", "subject1", "subject2", "ffn"]
    for i in range(2):
        a = f"transformer_blocks.{i}.attn1."
        assert got[a + "to_q"] == {"relation"} and got[a + "add_q_proj"] == {"relation"}
        assert got[a + "to_k"] == {"relation"} and got[a + "add_k_proj"] == {"relation"}
        assert got[a + "to_v"] == {"subject1", "subject2"} and got[a + "add_v_proj"] == {"subject1", "subject2"}
        assert got[a + "to_out.0"] == {"ffn"}
    assert got["transformer_blocks.0.attn1.to_add_out"] == {"ffn"}
    assert "transformer_blocks.1.attn1.to_add_out" not in got          # the last block has no text output
    assert not any(n.startswith("time_embed") for n in got)             # anchored: pooler.to_q untouched
    assert not any(".ff" in n for n in got)
    # rank 16, alpha 16, fp32 weights, all four active
    layer = dict(t.named_modules())["transformer_blocks.0.attn1.to_q"]
    assert layer.r["relation"] == 16 and layer.scaling["relation"] == 1.0
    assert all(p.dtype == torch.float32 for n, p in t.named_parameters() if "lora_" in n)
    assert set(t.active_adapters()) == set(PAPER)


@pytest.mark.parametrize("preset", sorted(PLACEMENTS))
def test_every_table_variant_is_one_config_line(preset):
    t = add_relation_lora_triplet(tiny_transformer(), LoRAConfig(placement=preset))
    assert _placement_by_module(t) == _expected(PLACEMENTS[preset])


def test_table3_relation_placements_are_what_the_paper_lists():
    assert set(PLACEMENTS["relation_v"]["relation"]) == {"to_v", "add_v_proj"}
    assert set(PLACEMENTS["relation_q"]["subject1"]) == {"to_k", "to_v", "add_k_proj", "add_v_proj"}
    assert set(PLACEMENTS["relation_kv"]["subject2"]) == {"to_q", "add_q_proj"}
    assert {k: set(v) for k, v in PLACEMENTS["paper"].items()} == PAPER
    assert "relation" not in PLACEMENTS["no_relation"] and "ffn" not in PLACEMENTS["no_ffn"]
    assert "subject1" not in PLACEMENTS["no_subject"] and "subject2" not in PLACEMENTS["no_subject"]


def test_custom_mapping_and_rank():
    cfg = LoRAConfig(rank=4, alpha=8, placement={"relation": ["to_q", "ff.net.2"], "ffn": "to_out.0"})
    t = add_relation_lora_triplet(tiny_transformer(), cfg)
    got = _placement_by_module(t)
    assert got["transformer_blocks.1.ff.net.2"] == {"relation"}
    layer = dict(t.named_modules())["transformer_blocks.0.attn1.to_q"]
    assert layer.r["relation"] == 4 and layer.scaling["relation"] == 2.0


@pytest.mark.parametrize("bad,msg", [("nope", "unknown LoRA placement"), ({"style": ["to_q"]}, "adapters are"),
                                     ({"relation": ["to_z"]}, "unknown projection"), ({}, "non-empty")])
def test_bad_placements_are_rejected(bad, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_placement(bad)
