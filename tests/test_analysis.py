"""Analysis tools: Q/K/V subspace similarity (known overlaps, tiny-model table) and relation-word attention maps."""
import numpy as np
import pytest
import torch
from PIL import Image

from dr_train.analysis import (capture_relation_attention, phrase_token_indices, plot_similarity_heatmap,
                               qkv_similarity_table, relation_attention_maps, save_attention_strip,
                               subspace_similarity)
from dr_train.model import encode_prompts, load_mochi, set_attention_backend, tiny_transformer

PROMPT = "A person is shaking hands with a person."


# ------------------------------------------------------------------------------------------ subspace similarity

def _orthonormal(n, seed=0):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _weight(u_nr, seed, n_in=24, tail=1e-3):
    """A (n, n_in) weight whose top singular subspace (output space) is span(u_nr), plus a tiny full-rank tail."""
    g = torch.Generator().manual_seed(seed)
    r = u_nr.shape[1]
    v, _ = torch.linalg.qr(torch.randn(n_in, r, generator=g, dtype=torch.float64))
    singular = torch.linspace(10, 5, r, dtype=torch.float64)
    return u_nr @ torch.diag(singular) @ v.T + tail * torch.randn(u_nr.shape[0], n_in, generator=g,
                                                                  dtype=torch.float64)


def test_identical_orthogonal_and_half_shared_subspaces():
    q = _orthonormal(16)
    a = _weight(q[:, :4], seed=1)
    assert subspace_similarity(a, a, rank=4) == pytest.approx(1.0, abs=1e-9)
    assert subspace_similarity(a, _weight(q[:, :4], seed=2), rank=4) == pytest.approx(1.0, abs=1e-5)
    assert subspace_similarity(a, _weight(q[:, 4:8], seed=3), rank=4) == pytest.approx(0.0, abs=1e-5)
    assert subspace_similarity(a, _weight(q[:, [0, 1, 4, 5]], seed=4), rank=4) == pytest.approx(0.5, abs=1e-5)


def test_invariant_to_rotation_within_the_subspace_and_to_scaling():
    q = _orthonormal(16, seed=5)
    base = q[:, [0, 1, 2, 6, 7, 8]]                                   # shares 3 of 6 directions with q[:, :6]
    rotation = _orthonormal(6, seed=6)
    a, b = _weight(q[:, :6], seed=7), _weight(base, seed=8)
    reference = subspace_similarity(a, b, rank=6)
    assert reference == pytest.approx(0.5, abs=1e-5)
    assert subspace_similarity(a, _weight(base @ rotation, seed=9), rank=6) == pytest.approx(reference, abs=1e-5)
    assert subspace_similarity(123.0 * a, 0.01 * b, rank=6) == pytest.approx(reference, abs=1e-9)
    assert subspace_similarity(a, b, rank=6) == pytest.approx(subspace_similarity(b, a, rank=6), abs=1e-12)


def test_input_space_uses_the_right_singular_vectors_and_random_subspaces_score_chance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 12, generator=g), torch.randn(20, 12, generator=g)
    assert subspace_similarity(a, b, 3, space="input") == pytest.approx(subspace_similarity(a.T, b.T, 3), abs=1e-9)
    values = [subspace_similarity(torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g), 8)
              for _ in range(20)]
    assert np.mean(values) == pytest.approx(8 / 64, abs=0.04)          # E = r / n for random subspaces
    with pytest.raises(ValueError, match="rank"):
        subspace_similarity(a, b, rank=13)
    with pytest.raises(ValueError, match="space"):
        subspace_similarity(a, b, rank=2, space="both")
    with pytest.raises(ValueError, match="differ"):
        subspace_similarity(a, torch.randn(10, 12), rank=2)


def test_per_block_table_and_heatmap_on_the_tiny_model(tmp_path):
    model = tiny_transformer()
    with torch.no_grad():                     # make block 1's K a rescaled, input-rotated copy of its Q
        attn = model.transformer_blocks[1].attn1
        attn.to_k.weight.copy_(3.0 * attn.to_q.weight @ _orthonormal(32, seed=3).float())
    rows = qkv_similarity_table(model, rank=8)
    assert [(r["block"], r["stream"]) for r in rows] == [(0, "visual"), (0, "text"), (1, "visual"), (1, "text")]
    for r in rows:
        assert r["rank"] == 8 and r["space"] == "output" and r["chance"] == pytest.approx(8 / 32)
        assert all(0.0 <= r[k] <= 1.0 for k in ("qk", "qv", "kv"))
    assert rows[2]["qk"] == pytest.approx(1.0, abs=1e-6) and rows[0]["qk"] < 0.9
    assert all(r[k] == pytest.approx(1.0) for r in qkv_similarity_table(model, rank=32) for k in ("qk", "qv", "kv"))
    png = plot_similarity_heatmap(rows, tmp_path / "qkv.png")
    assert Image.open(png).size[0] > 100
    with pytest.raises(ValueError, match="transformer_blocks"):
        qkv_similarity_table(torch.nn.Linear(2, 2), rank=1)


# ------------------------------------------------------------------------------------------ attention maps

@pytest.fixture(scope="module")
def tiny():
    return load_mochi("tiny")


def _rotate(x, cos, sin):
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def _reference_block(attn, inputs):
    """Full joint attention of one block, written out: (probabilities (B, H, T, T), video output (B, S, C))."""
    x, e = inputs["hidden_states"], inputs["encoder_hidden_states"]
    heads = attn.heads
    q = _rotate(attn.norm_q(attn.to_q(x).unflatten(2, (heads, -1))), *inputs["image_rotary_emb"])
    k = _rotate(attn.norm_k(attn.to_k(x).unflatten(2, (heads, -1))), *inputs["image_rotary_emb"])
    v = attn.to_v(x).unflatten(2, (heads, -1))
    eq = attn.norm_added_q(attn.add_q_proj(e).unflatten(2, (heads, -1)))
    ek = attn.norm_added_k(attn.add_k_proj(e).unflatten(2, (heads, -1)))
    ev = attn.add_v_proj(e).unflatten(2, (heads, -1))
    qq, kk, vv = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((q, eq), (k, ek), (v, ev)))
    logits = qq @ kk.transpose(-1, -2) / qq.shape[-1] ** 0.5
    valid = torch.cat([torch.ones(x.shape[0], x.shape[1], dtype=torch.bool), inputs["attention_mask"].bool()], 1)
    probs = torch.softmax(logits.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    video_out = (probs @ vv).transpose(1, 2).flatten(2)[:, :x.shape[1]]
    return probs, attn.to_out[0](video_out)


def test_phrase_tokens_are_found_in_the_model_tokenisation(tiny):
    indices, tokens = phrase_token_indices(tiny.tokenizer, PROMPT, "shaking hands", tiny.max_text_tokens)
    assert indices == [3, 4] and tokens == ["\u2581shaking", "\u2581hands"]
    assert phrase_token_indices(tiny.tokenizer, PROMPT, "Shaking", tiny.max_text_tokens)[0] == [3]
    with pytest.raises(ValueError, match="does not occur"):
        phrase_token_indices(tiny.tokenizer, PROMPT, "hugging", tiny.max_text_tokens)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("direction", ["video_to_text", "text_to_video"])
def test_captured_probabilities_match_a_full_softmax_and_processors_are_restored(tiny, backend, direction):
    transformer = tiny.transformer
    set_attention_backend(transformer, backend)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 12, 3, 8, 12, generator=g)
    embeds, mask = encode_prompts(tiny.text_encoder, tiny.tokenizer, [PROMPT], tiny.max_text_tokens)
    assert not mask.all()                                            # padded text keys must be masked out
    indices = [3, 4]
    originals = [b.attn1.processor for b in transformer.transformer_blocks]
    inputs, outputs = {}, {}
    attn0 = transformer.transformer_blocks[0].attn1
    hooks = [attn0.register_forward_pre_hook(lambda m, a, kw: inputs.update(kw), with_kwargs=True),
             attn0.register_forward_hook(lambda m, a, kw, out: outputs.update(video=out[0]), with_kwargs=True)]
    try:
        capture, out = capture_relation_attention(transformer, latents, embeds, mask, 600.0, indices, direction,
                                                  keep_heads=True, query_chunk=7)
    finally:
        for h in hooks:
            h.remove()
    assert [b.attn1.processor for b in transformer.transformer_blocks] == originals
    assert all(p is o for p, o in zip([b.attn1.processor for b in transformer.transformer_blocks], originals))
    with torch.no_grad():
        plain = transformer(hidden_states=latents, encoder_hidden_states=embeds, timestep=torch.tensor([600.0]),
                            encoder_attention_mask=mask, return_dict=False)[0]
        probs, video_out = _reference_block(attn0, inputs)
    assert torch.allclose(out, plain, atol=1e-6)                     # capturing does not change the forward pass
    assert torch.allclose(video_out, outputs["video"], atol=1e-5)   # the reference is the block's real attention
    seq = inputs["hidden_states"].shape[1]
    text_pos = [seq + i for i in indices]
    expected = probs[:, :, :seq, text_pos].transpose(-1, -2) if direction == "video_to_text" \
        else probs[:, :, text_pos, :seq]
    assert len(capture.blocks) == len(capture.heads) == 2
    assert capture.heads[0].shape == expected.shape == (1, 2, 2, seq)
    assert torch.allclose(capture.heads[0], expected, atol=1e-6)
    assert torch.allclose(capture.blocks[0], expected.mean(dim=1), atol=1e-6)
    set_attention_backend(transformer, "sdpa")


def test_processors_are_restored_when_the_forward_pass_fails(tiny):
    transformer = tiny.transformer
    originals = [b.attn1.processor for b in transformer.transformer_blocks]
    embeds, mask = encode_prompts(tiny.text_encoder, tiny.tokenizer, [PROMPT], tiny.max_text_tokens)
    with pytest.raises(RuntimeError):
        capture_relation_attention(transformer, torch.randn(1, 5, 3, 8, 12), embeds, mask, 500.0, [3])
    assert all(b.attn1.processor is o for b, o in zip(transformer.transformer_blocks, originals))
    with pytest.raises(ValueError, match="padded"):
        capture_relation_attention(transformer, torch.randn(1, 12, 3, 8, 12), embeds, mask, 500.0, [15])


def test_relation_maps_have_the_latent_grid_shape_and_make_pictures(tiny, tmp_path):
    latents = torch.randn(1, 12, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    for direction in ("video_to_text", "text_to_video"):
        result = relation_attention_maps(tiny.transformer, tiny.tokenizer, tiny.text_encoder, PROMPT,
                                         "shaking hands", latents, 500.0, tiny.max_text_tokens, direction)
        maps = result.maps_BFhw
        assert maps.shape == (1, 3, 4, 6) and (maps >= 0).all() and (maps <= 1).all() and maps.sum() > 0
        assert result.tokens == ["\u2581shaking", "\u2581hands"] and result.direction == direction
    png = save_attention_strip(maps[0], tmp_path / "strip.png", cell_height=32)
    assert Image.open(png).size == (3 * 48, 32)
    frames = np.random.default_rng(0).integers(0, 255, (13, 64, 96, 3), dtype=np.uint8)
    png = save_attention_strip(maps[0].numpy(), tmp_path / "over.png", frames_FHWC=frames, cell_height=40)
    assert Image.open(png).size == (3 * 60, 40)
    with pytest.raises(ValueError, match="multiples of the patch"):
        relation_attention_maps(tiny.transformer, tiny.tokenizer, tiny.text_encoder, PROMPT, "shaking hands",
                                torch.randn(1, 12, 3, 7, 12), 500.0, tiny.max_text_tokens)
