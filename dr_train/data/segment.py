"""Per-frame masks of the two subjects of a video: Grounding DINO boxes -> identity tracking -> SAM masks.

This is the Grounded-SAM recipe the official DreamRelation code points users to, with weights from local
folders (`from_pretrained(path)`; nothing is downloaded). Each subject's SAM mask comes from a box prompt: the
tracked detection, or the tracker's predicted box in frames where the detector missed the subject (those
frames are reported). Where the two masks overlap, the pixel goes to the subject whose box centre is nearer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dr_train.data.tracking import SubjectTracks, track_two_subjects

log = logging.getLogger(__name__)


@dataclass
class SegmentResult:
    masks: np.ndarray                       # (F, 2, H, W) float32 in {0, 1}, disjoint between the subjects
    boxes: np.ndarray                       # (F, 2, 4) float32 xyxy box prompts used (predicted where not detected)
    scores: np.ndarray                      # (F, 2) float32 detection scores, 0 where not detected
    missing_frames: dict[str, list[int]]    # subject -> frames the detector did not find it in


def _local_folder(path, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{what} weights folder {folder} does not exist")
    return folder


def _check_frames(frames_FHWC) -> np.ndarray:
    frames = np.asarray(frames_FHWC)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected (F, H, W, 3) uint8 frames, got shape {frames.shape} dtype {frames.dtype}")
    return frames


def disjoint_by_nearest_centre(masks_2HW: np.ndarray, boxes_24: np.ndarray) -> np.ndarray:
    """Pixels set in both masks go to the subject whose box centre is nearer."""
    both_HW = masks_2HW[0] & masks_2HW[1]
    if not both_HW.any():
        return masks_2HW
    ys, xs = np.nonzero(both_HW)
    centres_22 = (boxes_24[:, :2] + boxes_24[:, 2:]) / 2
    px, py = xs + 0.5, ys + 0.5  # pixel (x, y) covers [x, x + 1) x [y, y + 1) in box coordinates
    d0 = (px - centres_22[0, 0]) ** 2 + (py - centres_22[0, 1]) ** 2
    d1 = (px - centres_22[1, 0]) ** 2 + (py - centres_22[1, 1]) ** 2
    out = masks_2HW.copy()
    out[1, ys[d0 <= d1], xs[d0 <= d1]] = False
    out[0, ys[d0 > d1], xs[d0 > d1]] = False
    return out


class GroundingSamSegmenter:
    """Two-subject video segmentation from local Grounding DINO and SAM checkpoints."""

    def __init__(self, grounding_dino_path, sam_path, prompt: str = "a person.", box_threshold: float = 0.3,
                 text_threshold: float = 0.25, device=None, dtype: torch.dtype = torch.float32,
                 batch_size: int = 8):
        # deferred: transformers' detectors are a heavy import, needed only here
        from transformers import AutoProcessor, GroundingDinoForObjectDetection, SamModel, SamProcessor

        dino_folder = _local_folder(grounding_dino_path, "Grounding DINO")
        sam_folder = _local_folder(sam_path, "SAM")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.prompt = prompt
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.batch_size = batch_size
        try:
            self.dino_processor = AutoProcessor.from_pretrained(dino_folder)
            self.dino = GroundingDinoForObjectDetection.from_pretrained(dino_folder)
        except (OSError, ValueError) as err:
            raise ValueError(f"Grounding DINO weights folder {dino_folder} could not be loaded: {err}") from err
        try:
            self.sam_processor = SamProcessor.from_pretrained(sam_folder)
            self.sam = SamModel.from_pretrained(sam_folder)
        except (OSError, ValueError) as err:
            raise ValueError(f"SAM weights folder {sam_folder} could not be loaded: {err}") from err
        self.dino = self.dino.to(self.device, dtype).eval()
        self.sam = self.sam.to(self.device, dtype).eval()

    def _batches(self, frames: np.ndarray):
        for start in range(0, len(frames), self.batch_size):
            yield start, frames[start:start + self.batch_size]

    @torch.no_grad()
    def detect(self, frames_FHWC) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per frame: (N, 4) xyxy boxes in pixels and (N,) scores of `prompt`, in the detector's order."""
        frames = _check_frames(frames_FHWC)
        height, width = frames.shape[1:3]
        boxes, scores = [], []
        for _, batch in self._batches(frames):
            inputs = self.dino_processor(images=list(batch), text=[self.prompt] * len(batch), return_tensors="pt")
            inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                      for k, v in inputs.items()}
            outputs = self.dino(**inputs)
            outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
            results = self.dino_processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[(height, width)] * len(batch))
            for result in results:
                boxes.append(result["boxes"].cpu().numpy().astype(np.float64).reshape(-1, 4))
                scores.append(result["scores"].cpu().numpy().astype(np.float64).reshape(-1))
        return boxes, scores

    @torch.no_grad()
    def masks_from_boxes(self, frames_FHWC, boxes_F24) -> np.ndarray:
        """(F, 2, H, W) float32 disjoint SAM masks prompted with one box per subject per frame."""
        frames = _check_frames(frames_FHWC)
        height, width = frames.shape[1:3]
        boxes_F24 = np.asarray(boxes_F24, dtype=np.float64)
        if boxes_F24.shape != (len(frames), 2, 4):
            raise ValueError(f"expected ({len(frames)}, 2, 4) boxes, got {boxes_F24.shape}")
        boxes_F24 = boxes_F24.clip(0, [width, height, width, height])
        usable_F2 = (boxes_F24[..., 2] - boxes_F24[..., 0] >= 1) & (boxes_F24[..., 3] - boxes_F24[..., 1] >= 1)
        masks_F2HW = np.zeros((len(frames), 2, height, width), dtype=bool)
        for start, batch in self._batches(frames):
            batch_boxes = boxes_F24[start:start + len(batch)]
            inputs = self.sam_processor(images=list(batch), input_boxes=batch_boxes.tolist(), return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
            outputs = self.sam(pixel_values=pixel_values, input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                               multimask_output=True)
            best_B2 = outputs.iou_scores.float().argmax(dim=-1)
            pred_B23hw = outputs.pred_masks.float()
            best_B21hw = torch.gather(
                pred_B23hw, 2, best_B2[..., None, None, None].expand(-1, -1, 1, *pred_B23hw.shape[-2:]))
            masks = self.sam_processor.post_process_masks(
                list(best_B21hw.cpu()), inputs["original_sizes"], inputs["reshaped_input_sizes"])
            for i, mask_21HW in enumerate(masks):
                masks_F2HW[start + i] = mask_21HW[:, 0].numpy()
        masks_F2HW &= usable_F2[..., None, None]
        for f in range(len(frames)):
            masks_F2HW[f] = disjoint_by_nearest_centre(masks_F2HW[f], boxes_F24[f])
        return masks_F2HW.astype(np.float32)

    def segment(self, frames_FHWC) -> SegmentResult:
        frames = _check_frames(frames_FHWC)
        boxes, scores = self.detect(frames)
        try:
            tracks: SubjectTracks = track_two_subjects(boxes, scores)
        except ValueError as err:
            raise ValueError(f"Grounding DINO found fewer than two {self.prompt!r} in every frame "
                             f"(box_threshold={self.box_threshold}): {err}") from err
        missing = tracks.missing_frames()
        for subject, frame_list in missing.items():
            if frame_list:
                log.warning("%s not detected in %d of %d frames (%s); its mask there comes from the predicted box",
                            subject, len(frame_list), len(frames), ", ".join(map(str, frame_list)))
        masks_F2HW = self.masks_from_boxes(frames, tracks.boxes_F24)
        return SegmentResult(masks=masks_F2HW, boxes=tracks.boxes_F24, scores=tracks.scores_F2,
                             missing_frames=missing)
