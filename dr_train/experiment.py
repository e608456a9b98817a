"""Weights & Biases, when `log.wandb` is on: one W&B run per relation with the same scalars as TensorBoard and the
validation keyframes and videos. The API key is W&B's business (WANDB_API_KEY or `wandb login`): nothing here
reads, logs or stores it, and the config sent to W&B is the training config, which has no key in it."""
from __future__ import annotations

from pathlib import Path


class WandbRun:
    def __init__(self, cfg, relation: str, out_dir: Path):
        try:
            import wandb
        except ImportError:
            raise ValueError("log.wandb is on but the wandb package is not installed (pip install wandb)") from None
        self.wandb = wandb
        self.run = wandb.init(project=cfg.log.wandb_project, entity=cfg.log.wandb_entity or None,
                              mode=cfg.log.wandb_mode or None, name=relation, group=Path(cfg.train.output_dir).name,
                              dir=str(out_dir), config=cfg.to_dict(), reinit="create_new")

    def scalars(self, values: dict, step: int) -> None:
        self.run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def validation(self, relation: str, items: list[dict], step: int) -> None:
        """Keyframe grids and mp4s of one validation round (dicts with index, seed, prompt, keyframes, video)."""
        media = {}
        for item in items:
            key = f"{relation}/validation/{item['index']:02d}_s{item['seed']}"
            media[key] = self.wandb.Image(item["keyframes"], caption=item["prompt"])
            media[key + "_video"] = self.wandb.Video(item["video"], caption=item["prompt"], format="mp4")
        self.run.log(media, step=step)

    def finish(self) -> None:
        self.run.finish()
