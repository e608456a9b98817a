#!/usr/bin/env python
"""Profile one training step of the real trainer: per-phase seconds, tokens/s, TFLOP/s, MFU, memory, GPU telemetry.

    python perf/profile_step.py --preset tiny --out /tmp/profile                 # CPU or GPU: plumbing, seconds
    python perf/profile_step.py --preset mochi                                   # Mochi-1, 61x480x848, one GPU
    python perf/profile_step.py --preset mochi --frames 37 --no-gradient-checkpointing --steps 8

What is timed is `RelationRun.train_step` itself (HMT draw, data, forward, loss, backward, optimizer), on a dataset
of fabricated samples of the right shapes written to shards by `perf/bench_loader.py::fabricate`, so the step is
the trainer's own code and reads its data the way training does. `--preset mochi` builds `MochiTransformer3DModel`
with Mochi-1's real configuration and random weights directly on the GPU in bf16 (nothing is downloaded; timing
does not depend on the weights). `--preset tiny` is the 2-block preset of `dr_train.model`.

Phases come from the trainer's `PhaseTimer` (`run.timer`; each phase boundary synchronises the GPU): data,
forward, loss, backward, optimizer, and comms, which is 0 in this single-process trainer: the distributed module
will time its collectives under the phase name "comms" and they then appear here unchanged. Per-phase and step
seconds are medians over the timed steps; "other" is the step minus its phases (HMT selection, Python).

FLOPs are analytic (`dr_train.flops`, validated against torch's FlopCounterMode in tests/test_profile_step.py):
model FLOPs (forward + backward of the frozen-base LoRA step; the MFU numerator) and hardware FLOPs (plus the
gradient-checkpointing recompute; HFU). MFU = achieved / the device's dense bf16 peak (`dr_train.flops.
PEAK_BF16_TFLOPS`, or --peak-tflops). Memory: torch.cuda.max_memory_allocated / max_memory_reserved over the timed
steps (on CPU the process's max RSS). GPU telemetry (utilisation, memory used, power, SM clock) is sampled through
NVML (pynvml) in a background thread during the timed steps; without NVML the JSON says "unavailable: <reason>".

Writes <out>/profile_step_<preset>_<device>_<time>.json (device, versions, git hash, config, results, FLOPs) and
a .png beside it (phases stacked per step, and the headline numbers). For the mochi preset the summary compares
with genmo's published LoRA fine-tuning step on one H100 SXM: 3.35 s/it at 64 GB for 61-frame 480x848 clips
(genmo/mochi demos/fine_tuner/README.md). Targets are reported, never asserted.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import platform
import re
import resource
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from bench_kernels import triton_version  # noqa: E402
from bench_loader import fabricate  # noqa: E402
from common import device_name, git_hash  # noqa: E402
from diffusers import MochiTransformer3DModel  # noqa: E402

from dr_train import flops as flop_model, geometry  # noqa: E402
from dr_train.catalog import Relation  # noqa: E402
from dr_train.config import load_config  # noqa: E402
from dr_train.data.sources import synthetic_latent_size  # noqa: E402
from dr_train.distributed import Dist  # noqa: E402
from dr_train.model import MochiComponents, load_mochi, set_attention_backend  # noqa: E402
from dr_train.model.loading import MOCHI_TEXT_TOKENS, resolve_dtype  # noqa: E402
from dr_train.model.frozen_base import prepare_frozen_base  # noqa: E402
from dr_train.model.presets import TINY_TEXT_TOKENS  # noqa: E402
from dr_train.trainer import NonFiniteLossError, RelationRun  # noqa: E402

PHASES = ("data", "forward", "loss", "backward", "optimizer", "comms")
PRESETS = ("tiny", "mochi")
# genmo/mochi demos/fine_tuner/README.md, "Settings tested on 1x H100 SXM": LoRA on Q, K, V and the output
# projection, activation checkpointing (qkv, ff, post-attention) in all 48 layers, batch 1
GENMO = {"seconds_per_step": 3.35, "peak_memory_GB": 64.0, "frames": 61, "height": 480, "width": 848,
         "device": "1x H100 SXM", "source": "genmo/mochi demos/fine_tuner/README.md (LoRA fine-tuner, batch 1, "
                                             "all 48 layers checkpointed)"}


# ---- model and data ---------------------------------------------------------------------------------------------
def build_mochi_components(device: torch.device, dtype: torch.dtype, attention_backend: str,
                           gradient_checkpointing: bool, num_layers: int | None, text_tokens: int):
    """MochiComponents holding only a Mochi-1 transformer (real config, random weights), built on `device` in
    `dtype` directly (no fp32 copy, no download), frozen and set up the way `load_mochi` sets up a loaded one."""

    kwargs = {k: v for k, v in dataclasses.asdict(flop_model.MOCHI_1).items()}
    kwargs.update(qk_norm="rms_norm", activation_fn="swiglu", max_sequence_length=text_tokens)
    if num_layers:
        kwargs["num_layers"] = num_layers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = MochiTransformer3DModel(**kwargs)
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    transformer.eval()
    set_attention_backend(transformer, attention_backend)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return MochiComponents(transformer=transformer, vae=None, text_encoder=None, tokenizer=None, scheduler=None,
                           max_text_tokens=text_tokens, source="Mochi-1 config, random weights (perf/profile_step.py)",
                           identity="random:perf/profile_step.py")


def limit_prompt(stream, tokens: int) -> None:
    """Mark only the first `tokens` text tokens of every batch valid, as a real prompt padded to the T5 length is
    (the fabricated samples are fully valid). Runs inside the trainer's data phase."""
    read = stream.next_batch

    def next_batch():
        batch = read()
        mask = batch.text_mask.clone()
        mask[:, tokens:] = False
        return dataclasses.replace(batch, text_mask=mask)

    stream.next_batch = next_batch


# ---- telemetry --------------------------------------------------------------------------------------------------
class NvmlSampler:
    """GPU utilisation, memory used, power and SM clock sampled every `interval` s in a daemon thread."""

    METRICS = ("gpu_util_pct", "mem_util_pct", "memory_used_GB", "power_W", "sm_clock_MHz", "temperature_C")

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.interval, self.samples, self.static = interval, [], {}
        self.note: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.nvml = self.handle = None
        try:
            import pynvml
        except ImportError as e:
            self.note = f"unavailable: pynvml is not installed ({e})"
            return
        try:
            pynvml.nvmlInit()
            self.nvml = pynvml
            if device.type != "cuda":
                self.note = "not sampled: the run is on the CPU"
                return
            self.handle = self._handle(pynvml, device)
            self.static = self._static()
        except pynvml.NVMLError as e:
            self.note = f"unavailable: {e}"
            self.handle = None

    @staticmethod
    def _handle(pynvml, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            try:
                text = str(uuid)
                return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
            except pynvml.NVMLError:
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(index)     # CUDA_VISIBLE_DEVICES may reorder: UUID first

    def _try(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError:
            return None

    def _static(self) -> dict:
        n = self.nvml
        name = self._try(n.nvmlDeviceGetName)
        limit = self._try(n.nvmlDeviceGetEnforcedPowerLimit)
        mem = self._try(n.nvmlDeviceGetMemoryInfo)
        try:
            driver = n.nvmlSystemGetDriverVersion()
        except n.NVMLError:
            driver = None
        as_text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        return {"name": as_text(name), "driver": as_text(driver),
                "power_limit_W": None if limit is None else limit / 1000,
                "max_sm_clock_MHz": self._try(n.nvmlDeviceGetMaxClockInfo, n.NVML_CLOCK_SM),
                "memory_total_GB": None if mem is None else mem.total / 1e9}

    def sample(self) -> dict:
        n = self.nvml
        util = self._try(n.nvmlDeviceGetUtilizationRates)
        mem = self._try(n.nvmlDeviceGetMemoryInfo)
        power = self._try(n.nvmlDeviceGetPowerUsage)
        return {"gpu_util_pct": None if util is None else util.gpu,
                "mem_util_pct": None if util is None else util.memory,
                "memory_used_GB": None if mem is None else mem.used / 1e9,
                "power_W": None if power is None else power / 1000,
                "sm_clock_MHz": self._try(n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_SM),
                "temperature_C": self._try(n.nvmlDeviceGetTemperature, n.NVML_TEMPERATURE_GPU)}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def start(self) -> None:
        if self.handle is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def report(self) -> dict | str:
        if self.note:
            return self.note
        out = {"samples": len(self.samples), "interval_s": self.interval, **self.static}
        for m in self.METRICS:
            values = [s[m] for s in self.samples if s[m] is not None]
            out[m] = {"mean": statistics.fmean(values), "max": max(values)} if values else None
        return out

    def close(self) -> None:
        self.stop()
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass


def memory_report(device: torch.device, weights_bytes: int | None) -> dict:
    if device.type == "cuda":
        return {"kind": "cuda", "weights_and_adapters_GB": None if weights_bytes is None else weights_bytes / 1e9,
                "max_allocated_GB": torch.cuda.max_memory_allocated(device) / 1e9,
                "max_reserved_GB": torch.cuda.max_memory_reserved(device) / 1e9,
                "device_total_GB": torch.cuda.get_device_properties(device).total_memory / 1e9}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    return {"kind": "cpu", "max_rss_GB": rss_kb * 1024 / 1e9,
            "note": "process max RSS over its whole life (model, data, steps)"}


# ---- summary, plot ----------------------------------------------------------------------------------------------
def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarise(steps: list[dict], visual_tokens_per_step: int, peak: float | None) -> dict:
    seconds = [s["seconds"] for s in steps]
    step_s = statistics.median(seconds)
    phases = {p: statistics.median(s["phases"][p] for s in steps) for p in PHASES}
    other = statistics.median(s["other"] for s in steps)
    model = int(statistics.median(s["flops_model"] for s in steps))
    hardware = int(statistics.median(s["flops_hardware"] for s in steps))
    tf_model, tf_hw = model / step_s / 1e12, hardware / step_s / 1e12
    return {
        "step_seconds": {"median": step_s, "p20": quantile(seconds, 0.2), "p80": quantile(seconds, 0.8),
                         "mean": statistics.fmean(seconds), "all": seconds},
        "phases_median_s": phases | {"other": other},
        "phases_note": {"comms": "single process: no distributed module yet (0 s); its collectives will be timed "
                                 "under the phase name 'comms'" if not any(s["phases"]["comms"] for s in steps)
                        else "timed by the trainer",
                        "other": "step minus every timed phase: HMT draw, Python (phases the trainer times under "
                                 "other names are listed per step in extra_phases)"},
        "visual_tokens_per_step": visual_tokens_per_step,
        "tokens_per_s": visual_tokens_per_step / step_s,
        "flops_per_step": {"model": model, "hardware": hardware},
        "tflops_model": tf_model, "tflops_hardware": tf_hw,
        "mfu": None if not peak else tf_model / peak, "hfu": None if not peak else tf_hw / peak,
    }


def fmt_gb(v) -> str:
    return "-" if v is None else f"{v:.2f} GB"


def headline(result: dict) -> list[str]:
    r, cfg = result["results"], result["config"]
    lines = [f"{result['device']} | preset {cfg['preset']} latent {cfg['latent_shape']} text {cfg['text_tokens']} | "
             f"checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'} | {result['status']}"]
    if cfg.get("note"):
        lines.append(f"note: {cfg['note']}")
    if "step_seconds" in r:
        st = r["step_seconds"]
        lines.append(f"step {st['median']:.4g} s (p20 {st['p20']:.4g}, p80 {st['p80']:.4g}) over "
                     f"{len(st['all'])} steps; {r['tokens_per_s']:.4g} visual tokens/s")
        mfu = "" if r["mfu"] is None else f"; MFU {r['mfu']:.1%}, HFU {r['hfu']:.1%} of " \
                                          f"{result['device_peak_bf16_tflops']:.0f}"
        lines.append(f"{r['tflops_model']:.4g} TFLOP/s model, {r['tflops_hardware']:.4g} with recompute{mfu}")
        lines.append("phases (median s): " + ", ".join(f"{k} {v:.4g}" for k, v in r["phases_median_s"].items()))
    m = r.get("memory", {})
    if m.get("kind") == "cuda":
        lines.append(f"peak memory: allocated {fmt_gb(m['max_allocated_GB'])}, reserved {fmt_gb(m['max_reserved_GB'])}"
                     f" (weights + adapters {fmt_gb(m['weights_and_adapters_GB'])})")
    elif m:
        lines.append(f"peak memory: max RSS {fmt_gb(m['max_rss_GB'])}")
    nv = r.get("nvml")
    if isinstance(nv, dict):
        g = lambda k: "-" if nv.get(k) is None else f"{nv[k]['mean']:.0f}/{nv[k]['max']:.0f}"  # noqa: E731
        lines.append(f"NVML mean/max: util {g('gpu_util_pct')} %, power {g('power_W')} W "
                     f"(limit {nv.get('power_limit_W')}), SM clock {g('sm_clock_MHz')} MHz, mem used "
                     f"{g('memory_used_GB')} GB")
    elif nv:
        lines.append(f"NVML: {nv}")
    return lines


def compare_genmo(result: dict) -> list[str]:
    r, cfg = result["results"], result["config"]
    g = GENMO
    same = (cfg["frames"], cfg["height"], cfg["width"]) == (g["frames"], g["height"], g["width"])
    lines = [f"genmo (published, {g['device']}, {g['frames']}x{g['height']}x{g['width']}): {g['seconds_per_step']} "
             f"s/it at {g['peak_memory_GB']:.0f} GB [{g['source']}]"]
    if "step_seconds" not in r:
        return lines + ["  no step completed here to compare"]
    step = r["step_seconds"]["median"]
    mem = r.get("memory", {}).get("max_reserved_GB")
    nv = r.get("nvml")
    used = nv.get("memory_used_GB") if isinstance(nv, dict) else None
    speed = g["seconds_per_step"] / step
    lines.append(f"  here: {step:.3g} s/it = {speed:.2f}x genmo's speed ({'faster' if speed >= 1 else 'slower'})"
                 + ("" if mem is None else f", {mem:.1f} GB reserved by torch ({mem / g['peak_memory_GB']:.2f}x "
                                           f"genmo's)")
                 + ("" if not used else f", {used['max']:.1f} GB used on the GPU (NVML, as nvidia-smi shows)")
                 + ("" if same else " [different clip size: not like for like]")
                 + ("" if "H100" in result["device"] else " [not an H100]"))
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only here

    r = result["results"]
    steps = r.get("per_step", [])
    fig, (ax, tx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    names = list(PHASES) + ["other"]
    colors = dict(zip(names, plt.get_cmap("tab10").colors))
    labels = [f"step {s['step']}" for s in steps] + (["median"] if steps else [])
    columns = [dict(s["phases"], other=s["seconds"] - sum(s["phases"].values())) for s in steps]
    if steps:
        columns.append(r["phases_median_s"])
    bottom = [0.0] * len(columns)
    for name in names:
        values = [c.get(name, 0.0) for c in columns]
        ax.bar(range(len(columns)), values, bottom=bottom, color=colors[name], label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    if result["config"]["preset"] == "mochi":
        ax.axhline(GENMO["seconds_per_step"], color="k", ls="--", lw=1, label="genmo 3.35 s/it (H100)")
    ax.set_xticks(range(len(columns)), labels, rotation=45, fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("training step by phase", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    tx.axis("off")
    lines = headline(result)
    if result["config"]["preset"] == "mochi":
        lines += compare_genmo(result)
    tx.text(0.0, 1.0, "\n\n".join(_wrap(l, 58) for l in lines), va="top", ha="left", fontsize=7.5, family="monospace",
            transform=tx.transAxes)
    fig.suptitle(f"profile_step {result['config']['preset']} on {result['device']} ({result['git_hash']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(line: str, width: int) -> str:
    return "\n".join(textwrap.wrap(line, width)) or line


# ---- main -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="tiny",
                    help="tiny: the 2-block preset (CPU or GPU); mochi: Mochi-1's config with random weights (GPU)")
    ap.add_argument("--frames", type=int, default=None, help="clip frames, 1 + 6k (mochi: 61; tiny: "
                                                             "6 * (data.latent_frames - 1) + 1)")
    ap.add_argument("--height", type=int, default=None, help="clip height in pixels (mochi: 480; tiny: 64)")
    ap.add_argument("--width", type=int, default=None, help="clip width in pixels (mochi: 848; tiny: 64)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: tiny 10, mochi 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (optimizer state, kernels)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="recompute each block in backward (default: on for mochi, as genmo's 64 GB figure; "
                         "off for tiny)")
    ap.add_argument("--batch-size", type=int, default=1, help="train.batch_size")
    ap.add_argument("--grad-accum", type=int, default=1, help="train.grad_accum")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="valid text tokens per sample, the rest padding (0: all valid). The sdpa backend "
                         "then takes its masked path, as real padded prompts do")
    ap.add_argument("--num-layers", type=int, default=None, help="mochi: override Mochi-1's 48 blocks "
                                                                 "(smaller GPUs, plumbing checks)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available); mochi on cpu "
                                                   "only when asked for explicitly (a plumbing check)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="emulate a smaller card: cap this process's CUDA memory at this many GiB "
                         "(torch.cuda.set_per_process_memory_fraction) before the model is built; recorded, not "
                         "enforced, on a CPU")
    ap.add_argument("--nvml-interval", type=float, default=0.1, help="seconds between NVML samples")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                    help="any trainer config option, e.g. --set lora.rank=64 (repeatable)")
    ap.add_argument("--config", default=None, help="a trainer YAML config to start from")
    ap.add_argument("--work-dir", default=None, help="where the fabricated dataset and run folder go "
                                                     "(default: a temporary folder, removed at the end)")
    ap.add_argument("--out", default=str(REPO / "perf" / "results"), help="folder of the JSON and the plot")
    ap.add_argument("--no-plot", action="store_true")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    command = [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])
    mochi = args.preset == "mochi"
    device = resolve_device(args, mochi)
    if device is None:
        return 2
    steps = args.steps or (5 if mochi else 10)
    gc = args.gradient_checkpointing if args.gradient_checkpointing is not None else mochi
    if steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.memory_gb is not None and not args.memory_gb > 0:
        ap.error("--memory-gb must be > 0")
    memory_cap = apply_memory_cap(device, args.memory_gb)

    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        overrides = [f"train.output_dir={work / 'runs'}", "data.caption_dropout=0", "model.preset=tiny",
                     f"model.gradient_checkpointing={str(gc).lower()}", f"train.batch_size={args.batch_size}",
                     f"train.grad_accum={args.grad_accum}", f"train.max_steps={steps + args.warmup}"]
        try:
            cfg = load_config(args.config, overrides + list(args.set))
            frames, height, width = video_geometry(args, cfg, mochi)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        gc = cfg.model.gradient_checkpointing
        text_tokens = cfg.model.max_text_tokens or (MOCHI_TEXT_TOKENS if mochi else TINY_TEXT_TOKENS)
        if args.prompt_tokens < 0 or args.prompt_tokens > text_tokens:
            ap.error(f"--prompt-tokens must be in 0..{text_tokens}")
        shape = {"preset": args.preset, "frames": frames, "height": height, "width": width,
                 "gradient_checkpointing": gc, "memory_cap": memory_cap}

        t_build = time.perf_counter()
        try:
            comps = build_components(mochi, device, cfg, gc, args.num_layers, text_tokens)
        except torch.cuda.OutOfMemoryError as e:
            status = f"out of memory while building the model: {str(e).splitlines()[0][:300]}"
            print(f"{device_name(device)}: {status}", flush=True)
            failed = {"tool": "perf/profile_step.py", "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
                      "status": status, "device": device_name(device), "git_hash": git_hash(),
                      "versions": _versions(), "command": command, "config": shape,
                      "results": {"memory": memory_report(device, None)}}
            write_json(failed, Path(args.out), args.preset)
            return 3
        build_seconds = time.perf_counter() - t_build
        result, code = profile_run(args, cfg, comps, device, work, shape, text_tokens, build_seconds, command, steps)

    report(result, args, mochi)
    return code


def resolve_device(args, mochi: bool) -> torch.device | None:
    """The device to time on (an error printed and None when it cannot be used)."""
    if args.device is None:
        if mochi and not torch.cuda.is_available():
            print(f"error: --preset mochi times Mochi-1 (10B parameters, bf16, random weights) on a CUDA GPU, and "
                  f"this machine has none (torch {torch.__version__}, torch.cuda.is_available() is False). Run "
                  f"--preset tiny here; `--device cpu --num-layers 1 --frames 7 --height 64 --width 64` checks the "
                  f"mochi plumbing on a CPU (numbers meaningless).", file=sys.stderr)
            return None
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return None
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def video_geometry(args, cfg, mochi: bool) -> tuple[int, int, int]:
    """Frames, height and width of the timed clips: the flags, else Mochi-1's 61 x 480 x 848 or the config's
    synthetic clip size."""
    if mochi:
        frames, height, width = args.frames or 61, args.height or 480, args.width or 848
    else:
        lf, lh, lw = synthetic_latent_size(cfg)
        video_height, video_width = geometry.video_size(lh, lw)
        frames = args.frames or geometry.video_frames(lf)
        height, width = args.height or video_height, args.width or video_width
    geometry.check_video_size(frames, height, width, prefix="--")
    return frames, height, width


def build_components(mochi: bool, device, cfg, gc: bool, num_layers, text_tokens: int):
    """The transformer to time, with the config's frozen-base memory options (fp8, block swap) applied."""
    if mochi:
        dtype = resolve_dtype("mochi", cfg.model.dtype)
        comps = build_mochi_components(device, dtype, cfg.model.attention_backend, gc, num_layers, text_tokens)
    else:
        comps = load_mochi("tiny", cfg.model.dtype, cfg.model.attention_backend, gc, text_tokens,
                           parts=("transformer",))
    comps.block_swap = prepare_frozen_base(comps.transformer, cfg.model, cfg.lora, device)
    return comps


def profile_run(args, cfg, comps, device, work: Path, shape: dict, text_tokens: int, build_seconds: float,
                command: list[str], steps: int) -> tuple[dict, int]:
    """Build a one-process RelationRun on fabricated shards of the timed size, time its steps; (result, exit code)."""
    transformer = comps.transformer
    dims = flop_model.MochiDims.of(transformer)
    lat_f = geometry.latent_frames(shape["frames"])
    lat_h, lat_w = geometry.latent_size(shape["height"], shape["width"])
    global_batch = cfg.train.batch_size * cfg.train.grad_accum
    dataset = fabricate(work / "dataset", (dims.in_channels, lat_f, lat_h, lat_w), (text_tokens, dims.text_embed_dim),
                        samples=max(4, 2 * global_batch), per_shard=4)
    relation = Relation(name="bench", prompt="a fabricated sample (perf/profile_step.py)")
    run = RelationRun(cfg, comps, relation, work / "run", Dist(device=device), dataset)   # one process
    if args.prompt_tokens:
        limit_prompt(run.stream, args.prompt_tokens)
    weights_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    dev_name = device_name(device)
    peak = args.peak_tflops or (flop_model.peak_tflops(dev_name) if device.type == "cuda" else None)
    latent_shape = [cfg.train.batch_size, dims.in_channels, lat_f, lat_h, lat_w]
    attn_text = args.prompt_tokens if (args.prompt_tokens and cfg.model.attention_backend == "reference") else None
    result = {
        "tool": "perf/profile_step.py", "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "status": "ok", "device": dev_name, "device_peak_bf16_tflops": peak, "git_hash": git_hash(),
        "versions": _versions(), "command": command,
        "config": {
            **{k: shape[k] for k in ("preset", "frames", "height", "width")},
            "latent_shape": latent_shape, "text_tokens": text_tokens,
            "prompt_tokens": args.prompt_tokens or text_tokens, "gradient_checkpointing": shape["gradient_checkpointing"],
            "dtype": str(transformer.dtype).replace("torch.", ""),
            "attention_backend": cfg.model.attention_backend, "mixed_precision": cfg.train.mixed_precision,
            "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum, "steps": steps,
            "warmup": args.warmup, "model_build_seconds": build_seconds, "memory_cap": shape["memory_cap"],
            "parameters": sum(p.numel() for p in transformer.parameters()),
            "trainable_parameters": sum(p.numel() for ps in run.params_by_adapter.values() for p in ps),
            "model": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
            "train_config": cfg.to_dict(),
        },
        "results": {},
    }
    if args.preset == "mochi" and device.type != "cuda":
        result["config"]["note"] = "mochi preset on a CPU: a plumbing check, the numbers mean nothing"

    def count(trainable) -> flop_model.FlopCount:
        return flop_model.training_flops(dims, latent_shape, text_tokens, cfg.lora, trainable=trainable,
                                         gradient_checkpointing=shape["gradient_checkpointing"],
                                         attention_text_tokens=attn_text)

    result["flops_per_micro_step"] = count(None).to_dict()
    result["flops_per_micro_step"]["note"] = (
        "analytic (dr_train.flops), every adapter trainable (HMT 'relation' selection); per-step numbers in "
        "results use each step's own selection. model = forward + backward (MFU); hardware = model + "
        "checkpointing recompute (HFU). Attention backward counted 2x forward (fused kernels also recompute "
        "QK^T: +0.5x, not counted)")
    sampler = NvmlSampler(device, args.nvml_interval)
    print(f"{dev_name}: preset {args.preset}, latent {latent_shape}, text {text_tokens}, checkpointing "
          f"{'on' if shape['gradient_checkpointing'] else 'off'}, {human(result['config']['parameters'])} parameters "
          f"(built in {build_seconds:.1f} s); {args.warmup} warmup + {steps} timed steps", flush=True)
    per_step, status, code = time_steps(run, device, args.warmup, steps, sampler, count, cfg.train.grad_accum)
    result["status"] = status
    if per_step:
        result["results"] = summarise(per_step, run_tokens(dims, latent_shape, cfg.train.grad_accum), peak)
    result["results"]["memory"] = memory_report(device, weights_bytes)
    result["results"]["nvml"] = sampler.report()
    result["results"]["per_step"] = per_step
    sampler.close()
    if args.preset == "mochi":
        result["targets"] = {"genmo": GENMO, "comparison": compare_genmo(result)}
    run.close()
    return result, code


def time_steps(run, device, warmup: int, steps: int, sampler, count, accum: int) -> tuple[list[dict], str, int]:
    """`warmup` untimed then `steps` timed training steps, each split into the trainer's phases; an out-of-memory
    or non-finite loss ends the timing as a recorded status. (per-step records, status, exit code)"""
    per_step, status, code = [], "ok", 0
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            run.train_step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run.timer.enabled = True
        run.timer.reset()
        sampler.start()
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            record = run.train_step()
            sync()
            seconds = time.perf_counter() - t0
            measured = run.timer.reset()
            c = count(record["adapters_updated"])
            per_step.append({"step": record["step"], "seconds": seconds,
                             "phases": {p: measured.get(p, 0.0) for p in PHASES},
                             "extra_phases": {k: v for k, v in measured.items() if k not in PHASES},
                             "other": max(0.0, seconds - sum(measured.values())),
                             "selection": record["selection"], "loss": record["loss"],
                             "flops_model": c.model * accum, "flops_hardware": c.hardware * accum})
            print(f"  step {record['step']}: {seconds:.4g} s ({record['selection']}, loss "
                  f"{record['loss']:.4g})", flush=True)
    except torch.cuda.OutOfMemoryError as e:
        status, code = f"out of memory: {str(e).splitlines()[0][:300]}", 3
    except NonFiniteLossError as e:
        status, code = f"non-finite loss: {e}", 3
    finally:
        sampler.stop()
        run.timer.enabled = False
    return per_step, status, code


def report(result: dict, args, mochi: bool) -> None:
    """Write the JSON (and the plot), print the headline."""
    json_path = write_json(result, Path(args.out), args.preset)
    print("\n" + "\n".join(headline(result)))
    if mochi:
        print("\n".join(compare_genmo(result)))
    print(f"json: {json_path}")
    if not args.no_plot:
        png = json_path.with_suffix(".png")
        plot(result, png)
        print(f"plot: {png}")


def apply_memory_cap(device: torch.device, gigabytes: float | None) -> dict | None:
    """Cap this process's CUDA memory at `gigabytes` GiB (a smaller card, emulated); what was applied, for the JSON."""
    if gigabytes is None:
        return None
    if device.type != "cuda":
        return {"GiB": gigabytes, "enforced": False, "note": "no CUDA: recorded only"}
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, gigabytes * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"GiB": gigabytes, "enforced": True, "fraction": fraction, "device_total_GiB": total / 2**30}


def write_json(result: dict, out: Path, preset: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-")[:40]
    cap = (result["config"].get("memory_cap") or {}).get("GiB")
    tag = f"_cap{cap:g}GiB" if cap else ""
    path = out / f"profile_step_{preset}_{slug}{tag}_{result['timestamp'].replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def run_tokens(dims: flop_model.MochiDims, latent_shape, grad_accum: int) -> int:
    """Visual tokens one optimizer step trains on: batch x grad_accum x F x (H/p) x (W/p)."""
    b, _, f, h, w = latent_shape
    return b * grad_accum * f * (h // dims.patch_size) * (w // dims.patch_size)


def _versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda or "", "python": platform.python_version(),
           "triton": triton_version()}
    for name in ("diffusers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = ""
    return out


if __name__ == "__main__":
    sys.exit(main())
