#!/usr/bin/env python
"""Peak memory per rank of a training step: predicted (dr_train.memory_model) and, with --validate, measured.

    python perf/memory_model.py --preset mochi --frames 61 --height 480 --width 848       # one prediction
    python perf/memory_model.py --table                                                   # the README's table
    python perf/memory_model.py --validate                                                # CPU: predicted vs measured

--validate runs the trainer's own step (`RelationRun.train_step`, HMT, masked loss, RCL, AdamW) on the CPU for
three scaled-down Mochi architectures (fewer blocks, narrower) and compares the prediction with the measured peak:
the bytes of every tensor alive before the step (weights, adapters, optimizer state) plus the peak of what the
step allocates, from torch.profiler's allocation events. The GPU rows come from perf/results/<device>/
profile_step JSONs (torch.cuda.max_memory_allocated). Writes <out>/memory_model.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from bench_loader import fabricate  # noqa: E402
from diffusers import MochiTransformer3DModel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from dr_train import geometry  # noqa: E402
from dr_train.catalog import Relation  # noqa: E402
from dr_train.config import LoRAConfig, load_config  # noqa: E402
from dr_train.distributed import Dist  # noqa: E402
from dr_train.memory_model import GIB, architecture, predict  # noqa: E402
from dr_train.model import MochiComponents, set_attention_backend  # noqa: E402
from dr_train.trainer import RelationRun  # noqa: E402

# Scaled-down Mochi architectures (same block structure) and clip sizes the CPU can run in seconds.
VALIDATION = [
    {"name": "2 blocks, 4x64, 25x128x128, fp32", "layers": 2, "heads": 4, "head_dim": 64, "frames": 25,
     "height": 128, "width": 128, "dtype": "float32", "checkpointing": False},
    {"name": "3 blocks, 4x64, 25x128x192, bf16, checkpointing", "layers": 3, "heads": 4, "head_dim": 64,
     "frames": 25, "height": 128, "width": 192, "dtype": "bfloat16", "checkpointing": True},
    {"name": "2 blocks, 6x32, 37x96x128, bf16, batch 2", "layers": 2, "heads": 6, "head_dim": 32, "frames": 37,
     "height": 96, "width": 128, "dtype": "bfloat16", "checkpointing": False, "batch": 2},
]
TABLE_CLIPS = ((61, 480, 848), (37, 480, 848), (61, 256, 448))
TABLE_SETUPS = (("bf16 base, checkpointing (default)", dict(checkpointing=True)),
                ("bf16 base, no checkpointing", dict(checkpointing=False)),
                ("fp8 base, checkpointing", dict(checkpointing=True, fp8_base=True)),
                ("fp8 base, 16 blocks swapped (configs/memory/24gb.yaml)",
                 dict(checkpointing=True, fp8_base=True, blocks_to_swap=16)))
TEXT_TOKENS = 32


def scaled_arch(case: dict) -> dict:
    arch = architecture("mochi", num_layers=case["layers"])
    arch.update(num_attention_heads=case["heads"], attention_head_dim=case["head_dim"],
                pooled_projection_dim=case["heads"] * case["head_dim"] // 2, text_embed_dim=128,
                time_embed_dim=256, max_sequence_length=TEXT_TOKENS)
    return arch


def live_bytes(run) -> int:
    """Bytes of the distinct storages alive before a step: the transformer's parameters and gradients, the
    optimizer's state."""
    seen: dict[int, int] = {}
    tensors = [p for p in run.transformer.parameters()] + [p.grad for p in run.transformer.parameters()
                                                              if p.grad is not None]
    for state in run.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def step_peak_bytes(step) -> int:
    """Peak of the bytes `step()` allocates beyond what was alive before it (CPU allocator events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(case: dict, work: Path) -> int:
    """Measured peak bytes of the trainer's step for `case` on the CPU."""
    dtype = getattr(torch, case["dtype"])
    arch = scaled_arch(case)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        transformer = MochiTransformer3DModel(**arch)
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False).eval()
    set_attention_backend(transformer, "sdpa")
    if case["checkpointing"]:
        transformer.enable_gradient_checkpointing()
    comps = MochiComponents(transformer=transformer, vae=None, text_encoder=None, tokenizer=None, scheduler=None,
                            max_text_tokens=TEXT_TOKENS, source="perf/memory_model.py",
                            identity="random:perf/memory_model.py")
    batch = case.get("batch", 1)
    cfg = load_config(None, [f"train.output_dir={work / 'runs'}", "data.caption_dropout=0", "model.preset=tiny",
                             f"train.batch_size={batch}", "train.max_steps=10", 'train.mixed_precision="no"',
                             "train.kernels=torch", "hmt.enabled=false"])
    latent = (arch["in_channels"], geometry.latent_frames(case["frames"]),
              *geometry.latent_size(case["height"], case["width"]))
    dataset = fabricate(work / "dataset", latent, (TEXT_TOKENS, arch["text_embed_dim"]), samples=4 * batch,
                        per_shard=4)
    run = RelationRun(cfg, comps, Relation(name="bench", prompt="fabricated"), work / "run",
                      Dist(device=torch.device("cpu")), dataset)
    run.train_step()                      # the optimizer's state exists from the first step on
    before = live_bytes(run)
    peak = step_peak_bytes(run.train_step)
    run.close()
    return before + peak


def predicted(case: dict) -> int:
    arch = scaled_arch(case)
    latent = (case.get("batch", 1), arch["in_channels"], geometry.latent_frames(case["frames"]),
              *geometry.latent_size(case["height"], case["width"]))
    return predict(arch, latent, TEXT_TOKENS, LoRAConfig(), getattr(torch, case["dtype"]),
                   case["checkpointing"]).total


def gpu_rows() -> list[dict]:
    """Mochi-1 runs of committed gpu_check results beside the prediction for the same run: measured peaks
    (torch.cuda.max_memory_allocated), and out-of-memory runs (the prediction should exceed the cap or card)."""
    rows = []
    for path in sorted(glob.glob(str(REPO / "perf" / "results" / "*" / "profile_step_mochi_*.json"))):
        result = json.loads(Path(path).read_text())
        c, memory = result["config"], result["results"].get("memory", {})
        if "latent_shape" not in c or "max_allocated_GB" not in memory:
            continue
        b, ch, f, h, w = c["latent_shape"]
        p = predict(architecture("mochi"), (b, ch, f, h, w), c["text_tokens"], LoRAConfig(), torch.bfloat16,
                    c["gradient_checkpointing"])
        cap = (c.get("memory_cap") or {}).get("GiB")
        limit = f"{cap:.0f} GiB cap" if cap else f"{memory['device_total_GB'] * 1e9 / GIB:.0f} GiB card"
        row = {"name": f"Mochi-1 {c['frames']}x{c['height']}x{c['width']}, checkpointing "
                       f"{'on' if c['gradient_checkpointing'] else 'off'}, {result['device']}, {limit}",
               "predicted_GiB": p.total / GIB, "source": str(Path(path).relative_to(REPO))}
        if result.get("status") == "ok":
            row["measured_GiB"] = memory["max_allocated_GB"] * 1e9 / GIB
        elif str(result.get("status", "")).startswith("out of memory"):
            row["out_of_memory"] = True
            row["limit_GiB"] = cap or memory["device_total_GB"] * 1e9 / GIB
            row["agrees"] = not p.fits(int(row["limit_GiB"] * GIB))
        else:
            continue
        rows.append(row)
    return rows


def validate(out: Path) -> int:
    rows = []
    for case in VALIDATION:
        with tempfile.TemporaryDirectory(prefix="memory_model_") as tmp:
            measured = measure(case, Path(tmp))
        rows.append({"name": case["name"], "predicted_GiB": predicted(case) / GIB, "measured_GiB": measured / GIB,
                     "source": "CPU, this run"})
        print(f"{case['name']}: predicted {rows[-1]['predicted_GiB'] * 1024:.1f} MiB, measured "
              f"{rows[-1]['measured_GiB'] * 1024:.1f} MiB", flush=True)
    rows += gpu_rows()
    measured = [r for r in rows if "measured_GiB" in r]
    for r in measured:
        r["error"] = r["predicted_GiB"] / r["measured_GiB"] - 1
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    (out / "memory_model.json").write_text(json.dumps({"timestamp": stamp, "rows": rows}, indent=1) + "\n")
    lines = ["| configuration | predicted | measured | error | measured on |", "|---|---|---|---|---|"]
    for r in rows:
        unit, scale = ("MiB", 1024) if r["predicted_GiB"] < 1 else ("GiB", 1)
        if "measured_GiB" in r:
            lines.append(f"| {r['name']} | {r['predicted_GiB'] * scale:.1f} {unit} | {r['measured_GiB'] * scale:.1f} "
                         f"{unit} | {r['error']:+.1%} | {r['source']} |")
        else:
            verdict = "predicted not to fit: agrees" if r["agrees"] else "predicted to fit: DISAGREES"
            lines.append(f"| {r['name']} | {r['predicted_GiB']:.1f} GiB | out of memory | {verdict} | "
                         f"{r['source']} |")
    (out / "memory_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    worst = max(abs(r["error"]) for r in measured)
    disagree = [r["name"] for r in rows if r.get("agrees") is False]
    print(f"worst error {worst:.1%} (target: within 15 %); out-of-memory runs predicted to fit: {disagree or 'none'}")
    return 0 if worst <= 0.15 and not disagree else 1


def _card(p) -> str:
    if p.fits(24 * GIB):
        return ""
    return ": needs a 48 GB card" if p.fits(48 * GIB) else ": needs more than 48 GB"


def table() -> list[str]:
    """The README's memory table: predicted peak per GPU for Mochi-1 LoRA training (one rank, batch 1), with the
    one configuration measured on a GPU marked."""
    measured = {(r["name"].split(",")[0], "checkpointing on" in r["name"]): r["measured_GiB"] for r in gpu_rows()
                if "measured_GiB" in r}
    arch = architecture("mochi")
    lines = ["| setup | " + " | ".join(f"{f}x{h}x{w}" for f, h, w in TABLE_CLIPS) + " |",
             "|---|" + "---|" * len(TABLE_CLIPS)]
    for label, options in TABLE_SETUPS:
        cells = []
        for f, h, w in TABLE_CLIPS:
            latent = (1, 12, geometry.latent_frames(f), *geometry.latent_size(h, w))
            p = predict(arch, latent, 256, LoRAConfig(), torch.bfloat16, **options)
            cell = f"{p.total / GIB:.1f} GiB predicted"
            seen = measured.get((f"Mochi-1 {f}x{h}x{w}", options["checkpointing"]))
            if seen is not None and len(options) == 1:
                cell += f", {seen:.1f} measured"
            cells.append(cell + _card(p))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mochi", help="mochi, tiny, synth or a diffusers folder")
    ap.add_argument("--frames", type=int, default=61)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=848)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--validate", action="store_true", help="measure scaled-down configs on the CPU and compare")
    ap.add_argument("--table", action="store_true", help="print the README's memory table")
    ap.add_argument("--out", default=str(REPO / "perf" / "results"))
    a = ap.parse_args(argv)
    if a.validate:
        return validate(Path(a.out))
    if a.table:
        print("\n".join(table()))
        return 0
    try:
        geometry.check_video_size(a.frames, a.height, a.width, prefix="--")
        arch = architecture(a.preset)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    latent = (a.batch_size, arch.get("in_channels", 12), geometry.latent_frames(a.frames),
              *geometry.latent_size(a.height, a.width))
    p = predict(arch, latent, arch.get("max_sequence_length", 256), LoRAConfig(), getattr(torch, a.dtype),
                not a.no_gradient_checkpointing)
    print("\n".join(p.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
