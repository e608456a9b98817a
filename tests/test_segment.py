"""GroundingSamSegmenter with tiny random Grounding DINO and SAM checkpoints built from configs (no download)."""
import numpy as np
import pytest
import torch

from dr_train.data.segment import GroundingSamSegmenter, disjoint_by_nearest_centre
from dr_train.data.tracking import track_two_subjects

FRAMES, HEIGHT, WIDTH = 7, 48, 96


def build_tiny_grounding_dino(folder):
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import \
        GroundingDinoImageProcessorPil

    folder.mkdir()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "person", "."]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=32)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, num_queries=10, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, d_model=32, encoder_n_points=2, decoder_n_points=2,
                                 max_text_len=32, disable_custom_kernels=True)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 48, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def build_tiny_sam(folder):
    from transformers import (SamConfig, SamImageProcessorPil, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    vision = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=8,
                             mlp_dim=32)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=16)
    torch.manual_seed(0)
    SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)) \
        .save_pretrained(folder)
    image_processor = SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                           mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
    SamProcessor(image_processor).save_pretrained(folder)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    build_tiny_grounding_dino(root / "grounding_dino")
    build_tiny_sam(root / "sam")
    return GroundingSamSegmenter(root / "grounding_dino", root / "sam", box_threshold=0.0, text_threshold=0.0,
                                 device="cpu", batch_size=3)


def crossing_clip():
    """Frames (F, H, W, 3) and ground-truth boxes (F, 2, 4): a red disc moving right, a blue square moving left."""
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    frames = np.full((FRAMES, HEIGHT, WIDTH, 3), 90, dtype=np.uint8)
    boxes = np.zeros((FRAMES, 2, 4))
    for f in range(FRAMES):
        t = f / (FRAMES - 1)
        disc_x, square_x = 14 + 68 * t, 82 - 68 * t
        disc = (xs - disc_x) ** 2 + (ys - 26) ** 2 <= 9 ** 2
        square = (abs(xs - square_x) <= 7) & (abs(ys - 22) <= 7)
        frames[f][disc], frames[f][square] = (220, 40, 40), (40, 40, 220)
        for s, m in enumerate((disc, square)):
            yy, xx = np.nonzero(m)
            boxes[f, s] = xx.min(), yy.min(), xx.max() + 1, yy.max() + 1
    return frames, boxes


def test_missing_or_empty_weights_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="Grounding DINO weights folder .*nope"):
        GroundingSamSegmenter(tmp_path / "nope", tmp_path)
    with pytest.raises(ValueError, match="SAM weights folder .*no_sam"):
        GroundingSamSegmenter(tmp_path, tmp_path / "no_sam")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Grounding DINO weights folder .*empty could not be loaded"):
        GroundingSamSegmenter(tmp_path / "empty", tmp_path / "empty")


def test_segment_end_to_end(segmenter):
    frames, _ = crossing_clip()
    result = segmenter.segment(frames)
    assert result.masks.shape == (FRAMES, 2, HEIGHT, WIDTH) and result.masks.dtype == np.float32
    assert set(np.unique(result.masks)) <= {0.0, 1.0}
    assert result.masks.sum(axis=1).max() <= 1  # disjoint
    assert result.boxes.shape == (FRAMES, 2, 4) and result.scores.shape == (FRAMES, 2)
    assert ((result.scores >= 0) & (result.scores <= 1)).all()
    assert set(result.missing_frames) == {"subject1", "subject2"}
    # the boxes are the tracker's, from the detector's own output (10 query boxes per frame at threshold 0)
    boxes, scores = segmenter.detect(frames)
    assert [len(b) for b in boxes] == [10] * FRAMES
    np.testing.assert_allclose(result.boxes, track_two_subjects(boxes, scores).boxes_F24, atol=1e-4)


def test_masks_follow_the_tracked_identities(segmenter, monkeypatch):
    frames, true_boxes = crossing_clip()

    def detections(reverse):
        out_boxes = [true_boxes[f][::-1] if reverse else true_boxes[f] for f in range(FRAMES)]
        out_scores = [np.array([0.8, 0.9]) if reverse else np.array([0.9, 0.8]) for _ in range(FRAMES)]
        return lambda _frames: ([b.copy() for b in out_boxes], out_scores)

    monkeypatch.setattr(segmenter, "detect", detections(reverse=False))
    forward = segmenter.segment(frames)
    monkeypatch.setattr(segmenter, "detect", detections(reverse=True))
    reversed_order = segmenter.segment(frames)

    np.testing.assert_array_equal(forward.boxes, true_boxes)      # subject1 = the disc, also after crossing
    np.testing.assert_array_equal(reversed_order.boxes, true_boxes)
    assert (forward.masks != reversed_order.masks).mean() < 1e-3
    # masks come from each subject's own box prompt: swapping the prompts swaps the masks
    swapped = segmenter.masks_from_boxes(frames, true_boxes[:, ::-1])
    assert (swapped[:, ::-1] != forward.masks).mean() < 1e-3
    assert (forward.masks[:, 0] != forward.masks[:, 1]).mean() > 0.01


def test_boxes_outside_the_frame_give_empty_masks(segmenter):
    frames, true_boxes = crossing_clip()
    boxes = true_boxes.copy()
    boxes[2, 1] = [WIDTH + 5, 0, WIDTH + 30, 20]
    masks = segmenter.masks_from_boxes(frames, boxes)
    assert masks[2, 1].sum() == 0
    with pytest.raises(ValueError, match=r"expected \(7, 2, 4\) boxes"):
        segmenter.masks_from_boxes(frames, boxes[:3])
    with pytest.raises(ValueError, match="uint8"):
        segmenter.segment(frames.astype(np.float32))


def test_overlap_goes_to_the_nearer_box_centre():
    masks = np.zeros((2, 10, 20), dtype=bool)
    masks[0, :, 0:12] = True
    masks[1, :, 8:20] = True
    boxes = np.array([[0, 0, 12, 10], [8, 0, 20, 10]], dtype=float)  # centres x = 6 and 14
    out = disjoint_by_nearest_centre(masks, boxes)
    assert not (out[0] & out[1]).any()
    assert out[0, :, 8:10].all() and out[1, :, 10:12].all()
    assert out[0, :, :8].all() and out[1, :, 12:].all()
