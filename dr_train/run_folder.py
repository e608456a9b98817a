"""One relation's run folder, `<train.output_dir>/<relation>/`: what the trainer writes and everything else reads.

    DONE.json          the finished run's summary (steps, status, final losses, LoRA path); its presence = finished
    metrics.jsonl      one JSON line per step
    config.json        the run's whole config
    train.lock         present while a trainer holds the folder (host, pid; dr_train.run_lock)
    checkpoints/       step-NNNNNNNN/ (dr_train.checkpoint)
    lora/              the exported LoRA (pytorch_lora_weights.safetensors, ComfyUI file, model card)
    validation/        step-NNNNNNNN/ videos and keyframes of validation rounds
    tensorboard/       TensorBoard event files
    loss_curve.png     the loss curves
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class RelationFolder:
    path: Path

    @classmethod
    def of(cls, output_dir: str | Path, relation: str) -> "RelationFolder":
        return cls(Path(output_dir) / relation)

    @property
    def done(self) -> Path:
        return self.path / "DONE.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def lock(self) -> Path:
        return self.path / "train.lock"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def lora(self) -> Path:
        return self.path / "lora"

    @property
    def lora_weights(self) -> Path:
        return self.lora / LORA_FILE

    @property
    def validation(self) -> Path:
        return self.path / "validation"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def loss_curve(self) -> Path:
        return self.path / "loss_curve.png"
