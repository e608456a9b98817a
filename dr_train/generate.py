"""Generate a video with MochiPipeline (Euler flow-matching sampler) and an exported relation LoRA."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dr_train.data.video import write_mp4
from dr_train.model import load_mochi
from dr_train.plots import keyframe_grid


def generate(prompt: str, out_dir: Path, lora: str | None = None, preset: str = "tiny", steps: int = 64,
             guidance_scale: float = 6.0, num_frames: int = 61, height: int = 480, width: int = 848,
             seed: int = 0, fps: int = 30) -> dict:
    comps = load_mochi(preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = comps.pipeline().to(device)
    if lora:
        pipe.load_lora_weights(lora, adapter_name="relation_lora")
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, num_frames=num_frames,
               height=height, width=width, max_sequence_length=comps.max_text_tokens, output_type="np",
               generator=torch.Generator(device="cpu").manual_seed(seed))
    frames = out.frames[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    video = write_mp4(frames, out_dir / "video.mp4", fps=fps)
    grid = keyframe_grid(frames, out_dir / "keyframes.png")
    meta = {"prompt": prompt, "lora": lora, "base_model": comps.source, "steps": steps,
            "guidance_scale": guidance_scale, "seed": seed, "frames": int(frames.shape[0]),
            "video": str(video), "keyframes": str(grid)}
    (out_dir / "generation.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate a video (mp4 + keyframe grid) with an exported relation LoRA.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--lora", help="folder (or file) written by training's export: <run>/<relation>/lora")
    p.add_argument("--preset", default="tiny", help="'tiny' or a local diffusers Mochi-1 folder")
    p.add_argument("--output-dir", default="runs/generate")
    p.add_argument("--steps", type=int, default=64, help="Euler sampler steps")
    p.add_argument("--guidance-scale", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--num-frames", type=int, default=61)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (a.num_frames - 1) % 6:
        print(f"error: --num-frames must be 1 + 6k (Mochi's VAE), got {a.num_frames}", file=sys.stderr)
        return 2
    meta = generate(a.prompt, Path(a.output_dir), a.lora, a.preset, a.steps, a.guidance_scale, a.num_frames,
                    a.height, a.width, a.seed)
    print(json.dumps(meta, indent=1))
    return 0
