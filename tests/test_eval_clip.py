"""CLIP-T and temporal consistency (dr_train/eval/clip_metrics.py) on a tiny random CLIP saved to disk and read back
through the real `from_pretrained` path, with a CLIP tokenizer built offline (byte-level alphabet, no merges)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dr_train.eval.clip_metrics import CLIP_MEAN, CLIP_STD, ClipScorer, preprocess_frames, resized_size


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizerFast(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer(clip_dir, batch_size=3)


def video(num_frames=5, height=120, width=160, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)


def reference_pixels(frame_HWC: np.ndarray) -> torch.Tensor:
    """One frame preprocessed independently of the module: (1, 3, 224, 224)."""
    x = torch.from_numpy(frame_HWC).permute(2, 0, 1)[None].double() / 255.0
    h, w = x.shape[-2:]
    scale = 224 / min(h, w)
    size = (224, int(w * scale)) if h <= w else (int(h * scale), 224)
    x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
    x = x[..., top:top + 224, left:left + 224]
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_missing_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no_such_clip"):
        ClipScorer(tmp_path / "no_such_clip")


def test_preprocess_shape_and_resize_rule():
    assert resized_size(480, 848) == (224, 395)
    assert resized_size(848, 480) == (395, 224)
    pixels = preprocess_frames(np.zeros((2, 480, 848, 3), np.uint8))
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(np.zeros((2, 480, 848, 3), np.float32))
    with pytest.raises(ValueError):
        preprocess_frames(np.zeros((480, 848, 3), np.uint8))


def test_constant_colour_maps_to_normalised_constant():
    colour = np.array([200, 30, 120], np.uint8)
    frames = np.broadcast_to(colour, (1, 480, 848, 3)).copy()
    pixels = preprocess_frames(frames)
    expected = (torch.tensor(colour / 255.0) - torch.tensor(CLIP_MEAN, dtype=torch.float64)) / torch.tensor(CLIP_STD, dtype=torch.float64)
    assert torch.allclose(pixels[0].double(), expected.view(3, 1, 1).expand(3, 224, 224), atol=1e-5)


def test_centre_crop_without_resize_is_an_exact_slice():
    frames = video(1, 224, 300)
    pixels = preprocess_frames(frames)
    left = int(round((300 - 224) / 2))  # 38
    manual = torch.from_numpy(frames[0, :, left:left + 224]).permute(2, 0, 1).float() / 255.0
    manual = (manual - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(pixels[0], manual, atol=1e-6)


def test_preprocess_matches_independent_per_frame_version():
    frames = video(3, 97, 131, seed=3)
    pixels = preprocess_frames(frames)
    for i in range(3):
        assert torch.allclose(pixels[i:i + 1], reference_pixels(frames[i]).float(), atol=1e-5)


def test_identical_frames_give_temporal_consistency_one(scorer):
    frames = np.repeat(video(1, 90, 150, seed=1), 6, axis=0)
    assert abs(scorer.temporal_consistency(frames) - 1.0) < 1e-6


def test_clip_t_and_tc_equal_brute_force(scorer, clip_dir):
    frames, prompt = video(5, 120, 200, seed=2), "A dog is shaking hands with a cat."
    model, tokenizer = scorer.model, scorer.tokenizer
    with torch.no_grad():
        per_frame = []
        for frame in frames:
            pooled = model.vision_model(pixel_values=reference_pixels(frame).float()).pooler_output
            per_frame.append(model.visual_projection(pooled)[0].double())
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0].double()
    unit = [e / e.norm() for e in per_frame]
    mean = torch.stack(unit).mean(0)
    expected_clip_t = float(mean @ text / (mean.norm() * text.norm()))
    expected_tc = float(np.mean([float(unit[i] @ unit[i + 1]) for i in range(4)]))

    assert abs(scorer.clip_t(frames, prompt) - expected_clip_t) < 1e-5
    assert abs(scorer.temporal_consistency(frames) - expected_tc) < 1e-5
    scores = scorer.score(frames, prompt)
    assert scores["num_frames"] == 5
    assert abs(scores["clip_t"] - expected_clip_t) < 1e-5
    assert abs(scores["temporal_consistency"] - expected_tc) < 1e-5
    expected_frame_mean = float(np.mean([float(u @ text / text.norm()) for u in unit]))
    assert abs(scores["clip_t_frame_mean"] - expected_frame_mean) < 1e-5


def test_frame_stride_and_batch_size(scorer, clip_dir):
    frames, prompt = video(7, 64, 64, seed=4), "a person hugging a person"
    assert abs(scorer.clip_t(frames, prompt, frame_stride=3) - scorer.clip_t(frames[::3], prompt)) < 1e-6
    one_at_a_time = ClipScorer(clip_dir, batch_size=1)
    assert torch.allclose(one_at_a_time.image_embeds(frames), scorer.image_embeds(frames), atol=1e-5)
    embeds = scorer.image_embeds(frames)
    assert embeds.shape == (7, 16) and torch.allclose(embeds.norm(dim=-1), torch.ones(7), atol=1e-5)


def test_long_prompt_is_truncated_to_77_tokens(scorer):
    long_prompt = " ".join(["a very long prompt"] * 40)
    assert len(scorer.tokenizer(long_prompt)["input_ids"]) > 77
    embeds = scorer.text_embeds([long_prompt, "short"])
    assert embeds.shape == (2, 16) and torch.isfinite(embeds).all()


def test_temporal_consistency_needs_two_frames(scorer):
    with pytest.raises(ValueError, match="at least 2 frames"):
        scorer.temporal_consistency(video(1))
