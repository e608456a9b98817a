#!/usr/bin/env python
"""Benchmark the fused kernels against eager torch and torch.compile of the same references.

    python perf/bench_kernels.py                                   # tiny + mochi + sweep on the GPU
    python perf/bench_kernels.py --sizes mochi --dtypes bf16 --impls eager,triton
    TRITON_INTERPRET=1 python perf/bench_kernels.py --device cpu --sizes tiny --out /tmp/bench   # plumbing only

Kernels: fm_loss (masked flow-matching loss, target given), fm_loss_latents (the same with the target formed from
latents and noise: eager/compile compute z0 - noise first, the kernel never materialises it), rcl_features
(frame means + dynamics). Implementations: eager (the `dr_train.method` references), compile (torch.compile of the
same references, compiled per shape and dtype), triton (`kernels` with the backend forced to triton).
Passes: fwd (forward with pred requiring grad, as in training: the fused loss writes its gradient here), bwd
(backward only; the forward runs untimed before each repetition), full (forward + backward).

Timing: CUDA events around each repetition, the L2 cache flushed before each (as triton.testing.do_bench does),
median and 20/80 % quantiles; on CPU time.perf_counter. GB/s uses one byte model per kernel and pass, the same
for every implementation (the minimum traffic of the task: inputs read once, gradient written once; see
`bytes_moved`), so GB/s compare like for like; frac_of_peak divides by the device's HBM peak from PEAK_GBPS.
peak_mem_MB is the CUDA memory allocated by the timed call above what was allocated before it.

Results are appended to <out>/bench_kernels.csv (device, versions, git hash on every row) and plotted to
<out>/bench_kernels_<device>_<time>.png (GB/s against bytes moved, one panel per kernel and pass).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from common import append_csv, device_name, git_hash  # noqa: E402

import kernels  # noqa: E402
from dr_train.method.contrastive_loss import relation_features  # noqa: E402
from dr_train.method.flow_matching_loss import masked_flow_matching_loss  # noqa: E402

SIZES = {
    "tiny": [(2, 12, 3, 8, 8)],                                   # the tiny preset's latents
    "mochi": [(1, 12, 11, 60, 106)],                              # Mochi-1 480p, 61 frames
    "sweep": [(b, 12, 11, 60, 106) for b in (2, 4, 8, 16, 32)]    # up to ~27M elements, well past L2
             + [(1, 12, 31, 60, 106), (3, 12, 7, 97, 131)],       # a longer clip; odd (prime) sizes
}
KERNELS = ("fm_loss", "fm_loss_latents", "rcl_features")
IMPLS = ("eager", "compile", "triton")
PASSES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Peak HBM bandwidth (GB/s, vendor figures) by device-name substring; first match wins, so specific names first.
PEAK_GBPS = [
    ("GH200", 4000), ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("H800", 3350),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100-SXM4-40GB", 1555), ("A100-PCIE-40GB", 1555),
    ("A100", 1555), ("L40S", 864), ("L40", 864), ("L4", 300), ("A10G", 600), ("A10", 600),
    ("RTX 4090", 1008), ("RTX 3090", 936), ("V100", 900), ("MI300X", 5300), ("MI250", 3277),
]

CSV_COLUMNS = ["timestamp", "device", "device_peak_GBps", "torch", "triton", "cuda", "python", "git_hash",
               "kernel", "impl", "pass", "shape", "dtype", "mode", "numel", "bytes", "median_ms", "p20_ms",
               "p80_ms", "GBps", "frac_of_peak", "peak_mem_MB", "speedup_vs_eager", "speedup_vs_compile",
               "reps", "interpret", "check", "note"]


# ---- environment ------------------------------------------------------------------------------------------------
def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_GBPS:
        if key.lower() in name.lower():
            return float(value)
    return None


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:
        return ""


# ---- cases ------------------------------------------------------------------------------------------------------
def make_inputs(kernel: str, shape, dtype, device, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    B, C, F, H, W = shape
    x = {"pred": torch.randn(shape, device=device, dtype=dtype)}
    if kernel == "fm_loss":
        x["target"] = torch.randn(shape, device=device, dtype=dtype)
    elif kernel == "fm_loss_latents":
        x["z0"] = torch.randn(shape, device=device, dtype=dtype)
        x["noise"] = torch.randn(shape, device=device, dtype=dtype)
    if kernel.startswith("fm_loss"):
        x["mask"] = torch.rand((B, F, H, W), device=device, dtype=torch.float32)   # fractional, as after resizing
    else:
        x["g_means"] = torch.randn((B, F, C), device=device)
        x["g_dyn"] = torch.randn((B, F - 1, C), device=device)
    return x


def reference_fn(kernel: str, mask_weight: float, mode: str):
    if kernel == "fm_loss":
        return lambda pred, target, mask: masked_flow_matching_loss(pred, target, mask, mask_weight, mode)
    if kernel == "fm_loss_latents":
        return lambda pred, z0, noise, mask: masked_flow_matching_loss(pred, z0 - noise, mask, mask_weight, mode)
    return relation_features


def triton_fn(kernel: str, mask_weight: float, mode: str):
    if kernel == "fm_loss":
        return lambda pred, target, mask: kernels.masked_flow_matching_loss(pred, target, mask, mask_weight, mode)
    if kernel == "fm_loss_latents":
        return lambda pred, z0, noise, mask: kernels.masked_flow_matching_loss_from_latents(
            pred, z0, noise, mask, mask_weight, mode)
    return kernels.relation_features


def bytes_moved(kernel: str, x: dict, pass_: str) -> int:
    """Minimum traffic of the task: every input read once, the gradient written once (pred's dtype)."""
    pred = x["pred"]
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    if kernel.startswith("fm_loss"):
        reads = sum(nb(t) for k, t in x.items() if k in ("pred", "target", "z0", "noise", "mask"))
        grad = nb(pred)
        return {"fwd": reads, "bwd": grad, "full": reads + grad}[pass_]
    small = nb(x["g_means"]) + nb(x["g_dyn"])
    return {"fwd": nb(pred) + small, "bwd": nb(pred) + small, "full": 2 * nb(pred) + 2 * small}[pass_]


def call_args(kernel: str, x: dict, pred: torch.Tensor) -> tuple:
    if kernel == "fm_loss":
        return pred, x["target"], x["mask"]
    if kernel == "fm_loss_latents":
        return pred, x["z0"], x["noise"], x["mask"]
    return (pred,)


def grad_outputs(kernel: str, x: dict, upstream: float) -> tuple:
    if kernel.startswith("fm_loss"):
        return (torch.tensor(upstream, device=x["pred"].device),)
    return x["g_means"], x["g_dyn"]


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ---- timing -----------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        # do_bench-style L2 flush: write a buffer larger than any L2 before each repetition (not timed)
        self.flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device) if self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, fn, setup, reps: int, warmup: int) -> tuple[list[float], float | None]:
        """Times of `fn(state)` in ms (state = setup()), and the peak extra CUDA memory of one call in MB."""
        for _ in range(warmup):
            fn(setup())
        self.sync()
        peak_mb = None
        if self.cuda:
            state = setup()
            self.sync()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn(state)
            self.sync()
            peak_mb = (torch.cuda.max_memory_allocated(self.device) - base) / 2 ** 20
            del state
        times = []
        if self.cuda:
            events = []
            for _ in range(reps):
                state = setup()
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(state)
                end.record()
                events.append((start, end))
                del state
            self.sync()
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for _ in range(reps):
                state = setup()
                t0 = time.perf_counter()
                fn(state)
                times.append((time.perf_counter() - t0) * 1e3)
                del state
        return times, peak_mb


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def build_impl(impl: str, kernel: str, mask_weight: float, mode: str):
    if impl == "eager":
        return reference_fn(kernel, mask_weight, mode)
    if impl == "compile":
        torch._dynamo.reset()               # a fresh compile per case: no recompile limit, no stale guards
        return torch.compile(reference_fn(kernel, mask_weight, mode), dynamic=False)
    return triton_fn(kernel, mask_weight, mode)


def passes_for(fn, kernel: str, x: dict, upstream: float):
    """{pass: (timed_fn(state), setup() -> state)} for one implementation."""
    go = grad_outputs(kernel, x, upstream)

    def leaf():
        return x["pred"].detach().requires_grad_()

    def forward(pred):
        return as_tuple(fn(*call_args(kernel, x, pred)))

    def backward(state):
        pred, outs = state
        return torch.autograd.grad(outs, [pred], go[:len(outs)])

    return {
        "fwd": (lambda pred: forward(pred), leaf),
        "bwd": (backward, lambda: (lambda p: (p, forward(p)))(leaf())),
        "full": (lambda pred: torch.autograd.grad(forward(pred), [pred], go), leaf),
    }


def check_against_eager(kernel, x, impl_fn, eager_fn, upstream) -> str:
    """Outputs and gradient of an implementation against eager on the benchmark's own inputs."""
    go = grad_outputs(kernel, x, upstream)
    results = []
    for fn in (impl_fn, eager_fn):
        pred = x["pred"].detach().requires_grad_()
        outs = as_tuple(fn(*call_args(kernel, x, pred)))
        grad, = torch.autograd.grad(outs, [pred], go)
        results.append([o.detach().float() for o in outs] + [grad.float()])
    worst = 0.0
    for a, b in zip(*results):
        if a.numel():
            scale = b.abs().max().item() or 1.0
            worst = max(worst, (a - b).abs().max().item() / scale)
    limit = 1e-4 if x["pred"].dtype == torch.float32 else 2e-2
    return f"ok ({worst:.1e})" if worst <= limit else f"MISMATCH (max rel err {worst:.1e})"


# ---- plotting and summary ---------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path, device: str, peak: float | None) -> None:
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only here

    kernels_ = [k for k in KERNELS if any(r["kernel"] == k for r in rows)]
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(len(kernels_), len(passes), figsize=(4.6 * len(passes), 3.6 * len(kernels_)),
                             squeeze=False)
    styles = {"eager": "o-", "compile": "s--", "triton": "^-"}
    for i, k in enumerate(kernels_):
        for j, p in enumerate(passes):
            ax = axes[i][j]
            for impl in IMPLS:
                for dt in DTYPES:
                    sel = sorted((r for r in rows if r["kernel"] == k and r["pass"] == p and r["impl"] == impl
                                  and r["dtype"] == dt and r["GBps"] != ""), key=lambda r: r["bytes"])
                    if sel:
                        ax.plot([r["bytes"] for r in sel], [r["GBps"] for r in sel], styles[impl],
                                label=f"{impl} {dt}", alpha=0.6 if dt != "bf16" else 1.0)
            if peak:
                ax.axhline(peak, color="k", lw=0.8, ls=":", label=f"peak {peak:.0f}")
                ax.axhline(0.85 * peak, color="gray", lw=0.8, ls=":", label="85 % peak")
            ax.set_xscale("log")
            ax.set_title(f"{k} / {p}", fontsize=10)
            ax.set_xlabel("bytes moved (model)")
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"bench_kernels on {device}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(rows: list[dict], peak: float | None) -> list[str]:
    """Targets (reported, never asserted): triton >= 85 % of peak on the largest size, never slower than compile,
    >= 2x eager."""
    lines = []
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["kernel"], r["pass"], r["dtype"]), []).append(r)
    for (k, p, dt), rs in sorted(by_case.items()):
        tri = [r for r in rs if r["impl"] == "triton" and r["median_ms"] != ""]
        if not tri:
            continue
        largest = max(tri, key=lambda r: r["bytes"])
        frac = largest["frac_of_peak"]
        line = f"{k:16s} {p:4s} {dt:4s} largest {largest['shape']:>18s}: {largest['GBps']:8.1f} GB/s" \
            + (f" = {frac:5.1%} of peak [{'MET' if frac >= 0.85 else 'MISSED'} >=85%]" if frac != "" else "")
        for base, limit, what in (("compile", 1.0, "slower than compile"), ("eager", 2.0, "< 2x eager")):
            have = [r for r in tri if r[f"speedup_vs_{base}"] != ""]
            if have:
                bad = [r for r in have if r[f"speedup_vs_{base}"] < limit]
                worst = min(r[f"speedup_vs_{base}"] for r in have)
                line += f"; {what} on {len(bad)}/{len(have)} sizes (worst {worst:.2f}x)"
        lines.append(line)
    return lines


# ---- main -------------------------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple:
    dims = tuple(int(v) for v in re.split(r"[,x ]+", text.strip()) if v)
    if len(dims) != 5:
        raise argparse.ArgumentTypeError(f"--shape wants B,C,F,H,W, got {text!r}")
    return dims


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="tiny,mochi,sweep", help="comma list of " + ", ".join(SIZES))
    ap.add_argument("--shape", action="append", type=parse_shape, default=[], help="extra B,C,F,H,W (repeatable)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default fp32,bf16 on cuda, "
                                                   "fp32 on cpu)")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--mode", default="paper", choices=["paper", "official"])
    ap.add_argument("--mask-weight", type=float, default=50.0)
    ap.add_argument("--upstream", type=float, default=1.0,
                    help="upstream gradient of the loss (1/grad_accum in training; != 1 costs the fused "
                         "loss one in-place scaling pass in backward)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 cuda, 5 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 cuda, 1 cpu)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="override the device's peak bandwidth")
    ap.add_argument("--max-cpu-triton-numel", type=int, default=2_000_000,
                    help="on CPU the Triton interpreter is slow: skip triton above this many elements")
    ap.add_argument("--out", default=str(REPO / "perf" / "results"), help="folder of the CSV and the plot")
    ap.add_argument("--no-plot", action="store_true")
    return ap


def selections(ap: argparse.ArgumentParser, args, cuda: bool) -> tuple[list, list, list, list, list]:
    """dtypes, impls, kernels, passes and shapes asked for (argparse errors for unknown names)."""
    dtypes = (args.dtypes or ("fp32,bf16" if cuda else "fp32")).split(",")
    impls = [i for i in args.impls.split(",") if i]
    kernels_ = [k for k in args.kernels.split(",") if k]
    passes = [p for p in args.passes.split(",") if p]
    for name, values, allowed in (("dtype", dtypes, DTYPES), ("impl", impls, IMPLS), ("kernel", kernels_, KERNELS),
                                  ("pass", passes, PASSES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"unknown {name} {bad}; available: {', '.join(allowed)}")
    shapes = []
    for s in (v for v in args.sizes.split(",") if v):
        if s not in SIZES:
            ap.error(f"unknown size set {s!r}; available: {', '.join(SIZES)}")
        shapes += SIZES[s]
    return dtypes, impls, kernels_, passes, shapes + args.shape


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    dtypes, impls, kernels_, passes, shapes = selections(ap, args, cuda)
    reps = args.reps or (50 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)

    if "triton" in impls and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("note: CPU device: setting TRITON_INTERPRET=1 so the Triton kernels run in the interpreter "
              "(timings then measure the interpreter, not a GPU)")
        os.environ["TRITON_INTERPRET"] = "1"
    torch._dynamo.config.cache_size_limit = max(64, getattr(torch._dynamo.config, "cache_size_limit", 8))

    dev_name = device_name(device)
    peak = peak_gbps(dev_name, args.peak_gbps) if cuda else args.peak_gbps
    env = {"timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "device": dev_name,
           "device_peak_GBps": peak or "", "torch": torch.__version__, "triton": triton_version(),
           "cuda": torch.version.cuda or "", "python": platform.python_version(), "git_hash": git_hash(),
           "mode": args.mode, "reps": reps, "interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}
    print(f"device {dev_name} (peak {peak or '?'} GB/s), torch {env['torch']}, triton {env['triton'] or '-'}, "
          f"git {env['git_hash']}")
    timer = Timer(device)
    rows = []
    print(f"{'kernel':16s} {'impl':8s} {'pass':4s} {'shape':>20s} {'dtype':5s} {'median ms':>10s} "
          f"{'p20':>9s} {'p80':>9s} {'GB/s':>8s} {'%peak':>6s} {'mem MB':>8s}  check")
    for kernel in kernels_:
        for shape in shapes:
            for dt in dtypes:
                try:
                    x = make_inputs(kernel, shape, DTYPES[dt], device)
                except torch.cuda.OutOfMemoryError:
                    print(f"{kernel} {shape} {dt}: out of memory making inputs, skipped")
                    continue
                case_rows = bench_case(args, kernel, x, shape, dt, impls, passes, env, timer, reps, warmup, peak)
                add_speedups(case_rows)
                for r in case_rows:
                    print_row(r)
                rows += case_rows
                del x
                if cuda:
                    torch.cuda.empty_cache()
    write_outputs(rows, Path(args.out), env, dev_name, peak, args.no_plot)
    mismatches = [r for r in rows if r["check"].startswith("MISMATCH")]
    if mismatches:
        print(f"\n{len(mismatches)} rows MISMATCH eager: see the check column")
        return 1
    return 0


def bench_case(args, kernel: str, x: dict, shape, dt: str, impls, passes, env: dict, timer, reps: int, warmup: int,
               peak) -> list[dict]:
    """One kernel at one shape and dtype: every implementation checked against eager, then each pass timed."""
    cuda = torch.device(args.device).type == "cuda"
    numel = x["pred"].numel()
    case_rows = []
    eager_fn = reference_fn(kernel, args.mask_weight, args.mode)
    for impl in impls:
        note, check = "", ""
        if impl == "triton" and not cuda and numel > args.max_cpu_triton_numel:
            note = "skipped: interpreter too slow for this size"
        ctx = kernels.use_backend("triton") if impl == "triton" else contextlib.nullcontext()
        with ctx:
            fn = build_impl(impl, kernel, args.mask_weight, args.mode) if not note else None
            if fn is not None and impl != "eager":
                try:
                    check = check_against_eager(kernel, x, fn, eager_fn, args.upstream)
                except Exception as exc:   # compile/driver failures are results, not crashes
                    note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    fn = None
            for p in passes:
                row = dict(env, kernel=kernel, impl=impl, **{"pass": p},
                           shape="x".join(map(str, shape)), dtype=dt, numel=numel,
                           bytes=bytes_moved(kernel, x, p), median_ms="", p20_ms="", p80_ms="",
                           GBps="", frac_of_peak="", peak_mem_MB="", speedup_vs_eager="",
                           speedup_vs_compile="", check=check, note=note)
                if fn is not None:
                    timed, setup = passes_for(fn, kernel, x, args.upstream)[p]
                    try:
                        times, mem = timer.run(timed, setup, reps, warmup)
                        med = statistics.median(times)
                        row.update(median_ms=med, p20_ms=quantile(times, 0.2),
                                   p80_ms=quantile(times, 0.8), GBps=row["bytes"] / med / 1e6,
                                   peak_mem_MB="" if mem is None else round(mem, 2))
                        if peak:
                            row["frac_of_peak"] = row["GBps"] / peak
                    except Exception as exc:
                        row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                        if cuda:
                            torch.cuda.empty_cache()
                case_rows.append(row)
    return case_rows


def add_speedups(case_rows: list[dict]) -> None:
    """Each timed row's speedup over eager and over torch.compile, same case and pass."""
    for r in case_rows:
        if r["median_ms"] == "":
            continue
        for base in ("eager", "compile"):
            ref = [b for b in case_rows if b["impl"] == base and b["pass"] == r["pass"] and b["median_ms"] != ""]
            if ref and r["impl"] != base:
                r[f"speedup_vs_{base}"] = ref[0]["median_ms"] / r["median_ms"]


def print_row(r: dict) -> None:
    fmt = lambda v, f: (f.format(v) if v != "" else "-")  # noqa: E731
    print(f"{r['kernel']:16s} {r['impl']:8s} {r['pass']:4s} {r['shape']:>20s} {r['dtype']:5s} "
          f"{fmt(r['median_ms'], '{:10.4f}'):>10s} {fmt(r['p20_ms'], '{:9.4f}'):>9s} "
          f"{fmt(r['p80_ms'], '{:9.4f}'):>9s} {fmt(r['GBps'], '{:8.1f}'):>8s} "
          f"{fmt(r['frac_of_peak'], '{:6.1%}'):>6s} {fmt(r['peak_mem_MB'], '{:8.1f}'):>8s}  "
          f"{r['check']} {r['note']}")


def write_outputs(rows: list[dict], out: Path, env: dict, dev_name: str, peak, no_plot: bool) -> None:
    """Append the rows to bench_kernels.csv, draw the plot, print the summary against the targets."""
    csv_path = append_csv(out / "bench_kernels.csv",
                          [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                          CSV_COLUMNS)
    print(f"\nappended {len(rows)} rows to {csv_path}")
    if not no_plot and rows:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", dev_name).strip("-")[:40]
        png = out / f"bench_kernels_{slug}_{env['timestamp'].replace(':', '')}.png"
        plot(rows, png, dev_name, peak)
        print(f"plot: {png}")
    print("\ntargets (reported, not asserted): >= 85% of HBM peak on large sizes, never slower than "
          "torch.compile, >= 2x eager")
    for line in summarise(rows, peak):
        print("  " + line)


if __name__ == "__main__":
    sys.exit(main())
