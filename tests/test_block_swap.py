"""Block swap with a fake device split on the CPU: the swapped blocks' weights are separate copies that come and go,
and the outputs and gradients are exactly those of the model without swapping."""
import copy

import pytest
import torch

from dr_train.method.triplet import add_relation_lora_triplet
from dr_train.model import load_mochi
from dr_train.model.block_swap import BlockSwap


def _model(checkpointing=True):
    t = load_mochi("synth", parts=("transformer",)).transformer
    add_relation_lora_triplet(t)
    torch.manual_seed(0)
    for name, p in t.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    if checkpointing:
        t.enable_gradient_checkpointing()
    return t


def _run(model, probe=None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 12, 3, 8, 8, generator=g, requires_grad=True)
    text = torch.randn(1, 24, 64, generator=g)
    out = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([400.0]),
                encoder_attention_mask=torch.ones(1, 24, dtype=torch.bool), return_dict=False)[0]
    if probe:
        probe("after forward")
    (out * torch.linspace(-2, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _host_ptrs(swap, i):
    return [h.data_ptr() for h in swap.host_copies[i]]


def test_outputs_and_gradients_are_unchanged_and_swapped_blocks_leave():
    reference = _model()
    swapped = copy.deepcopy(reference)
    swap = BlockSwap(swapped, resident=2, device="cpu")
    n = len(swapped.transformer_blocks)
    assert n >= 4 and swap.swapped == list(range(2, n))
    seen = []

    def probe(when):
        for i in swap.swapped:                   # a block not on the "device" holds exactly its host copies
            ptrs = [t.data_ptr() for t in swap.frozen[i]]
            assert (ptrs == _host_ptrs(swap, i)) == (i not in swap.on_device())
        seen.append((when, swap.on_device(), torch._C._current_graph_task_id() != -1))

    for block in swapped.transformer_blocks:      # pre-hooks: checkpointing's recompute stops before a block ends
        block.register_forward_pre_hook(lambda *a: probe("block starts"))
    out_ref, gx_ref, g_ref = _run(reference)
    out, gx, grads = _run(swapped, probe)
    assert torch.equal(out, out_ref) and torch.equal(gx, gx_ref)
    assert set(grads) == set(g_ref) and all(torch.equal(grads[k], g_ref[k]) for k in g_ref)
    assert all(len(loaded) <= 2 for _, loaded, _ in seen)         # the running block and its prefetch
    assert ("after forward", [], False) in seen                  # every swapped block left after the forward
    forward = [loaded for _, loaded, backward in seen if not backward][:n]
    recomputed = [loaded for _, loaded, backward in seen if backward]
    # block i running, i + 1 prefetched (6 blocks: [], [], [2, 3], [3, 4], [4, 5], [5])
    assert forward == [[], []] + [[i, i + 1] for i in range(2, n - 1)] + [[n - 1]]
    # backward: block i running, i - 1 prefetched (6 blocks: [4, 5], [3, 4], [2, 3], [2], [2], [2])
    assert recomputed == [[i - 1, i] for i in range(n - 1, 2, -1)] + [[2]] * 3


def test_training_without_checkpointing_is_refused():
    model = _model(checkpointing=False)
    BlockSwap(model, resident=1, device="cpu")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        _run(model)


def test_inference_without_checkpointing_swaps_too():
    reference = _model(checkpointing=False)
    swapped = copy.deepcopy(reference)
    swap = BlockSwap(swapped, resident=0, device="cpu")
    kw = dict(hidden_states=torch.randn(1, 12, 3, 8, 8), encoder_hidden_states=torch.randn(1, 24, 64),
              timestep=torch.tensor([400.0]), encoder_attention_mask=torch.ones(1, 24, dtype=torch.bool),
              return_dict=False)
    with torch.no_grad():
        assert torch.equal(swapped(**kw)[0], reference(**kw)[0])
    assert swap.on_device() == []
    swap.remove()
    assert all(t.data_ptr() not in _host_ptrs(swap, i) for i in swap.swapped for t in swap.frozen[i])


def test_resident_count_is_checked():
    with pytest.raises(ValueError, match="blocks_to_swap"):
        model = _model()
        BlockSwap(model, resident=len(model.transformer_blocks), device="cpu")
