"""Backend selection for the fused kernels: Triton where it can run, the plain-torch reference elsewhere.

Setting (first that applies): `set_backend(name)` / `with use_backend(name):`, else the environment variable
`DR_TRAIN_KERNELS`, else "auto".

- "torch":  always the `dr_train.method` reference (flow_matching_loss, contrastive_loss).
- "triton": always the Triton kernel; a `ValueError` when Triton is missing or has no driver for the inputs'
            device (CUDA tensors need a CUDA GPU, CPU tensors need `TRITON_INTERPRET=1`).
- "auto":   the Triton kernel when the inputs are CUDA tensors and CUDA is available, or when they are CPU tensors
            and `TRITON_INTERPRET=1` is set; the torch reference otherwise (and for the few cases the kernels do
            not cover, e.g. a mask that requires grad).

`TRITON_INTERPRET` is read at call time: the kernels are jitted lazily, once per mode (see `LazyKernel`), so a
test may set it after `kernels` was imported.

This module also holds what every kernel shares (lazy jitting, launch options, tile sizes, layout checks), so the
kernels never import each other.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

ENV_VAR = "DR_TRAIN_KERNELS"
BACKENDS = ("auto", "triton", "torch")

try:  # Triton is optional: without it everything runs on the torch references.
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising something else at import
    triton = None
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_override: str | None = None


def _check(name: str, origin: str) -> str:
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} ({origin}); available: {', '.join(BACKENDS)}")
    return value


def set_backend(name: str | None) -> None:
    """Force 'auto', 'triton' or 'torch' for this process; None goes back to $DR_TRAIN_KERNELS (default auto)."""
    global _override
    _override = None if name is None else _check(name, "set_backend")


def get_backend() -> str:
    """The configured setting ('auto', 'triton' or 'torch'), not yet resolved for a device."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR, "").strip()
    return _check(env, f"${ENV_VAR}") if env else "auto"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager: `with use_backend("torch"): ...` restores the previous setting on exit."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def triton_available() -> bool:
    return triton is not None


def interpret_enabled() -> bool:
    """Whether Triton would build interpreted kernels now (TRITON_INTERPRET=1)."""
    if triton is not None:
        try:
            from triton import knobs
            return bool(knobs.runtime.interpret)
        except Exception:  # older Triton without knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_usable(device: torch.device | str) -> tuple[bool, str]:
    """(usable, reason) for running the Triton kernels on tensors of `device`."""
    device = torch.device(device)
    if triton is None:
        return False, f"Triton is not importable ({TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        if torch.cuda.is_available():
            return True, "CUDA"
        return False, "the inputs are CUDA tensors but CUDA is not available"
    if device.type == "cpu":
        if interpret_enabled():
            return True, "TRITON_INTERPRET=1"
        return False, "CPU tensors need TRITON_INTERPRET=1 (Triton has no CPU driver)"
    return False, f"no Triton driver for device type {device.type!r}"


def select(op: str, tensors: list[torch.Tensor], unsupported: str | None = None) -> str:
    """Resolve the setting for one call: 'triton' or 'torch'.

    `unsupported` is a reason the kernel cannot take this call (auto then uses torch; forced triton raises).
    """
    setting = get_backend()
    if setting == "torch":
        return "torch"
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) != 1:
        reason = f"inputs on several devices {sorted(map(str, devices))}" if devices else "no tensor inputs"
        usable = False
    else:
        usable, reason = triton_usable(next(iter(devices)))
    if usable and unsupported is not None:
        usable, reason = False, unsupported
    if usable:
        return "triton"
    if setting == "triton":
        raise ValueError(f"{op}: the Triton kernel was forced ({ENV_VAR}=triton or set_backend('triton')) but "
                         f"cannot run here: {reason}. Use 'auto' or 'torch' to fall back to the torch reference.")
    return "torch"


def info(device: torch.device | str | None = None) -> dict:
    """What the dispatcher would do: setting, Triton availability, interpret mode, and the backend it resolves
    to for `device` (default: cuda when available, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    usable, reason = triton_usable(device)
    setting = get_backend()
    if setting == "torch":
        resolved = "torch"
    elif usable:
        resolved = "triton"
    else:
        resolved = "error" if setting == "triton" else "torch"
    return {"setting": setting, "device": str(device), "resolved": resolved, "reason": reason,
            "triton_version": getattr(triton, "__version__", None), "triton_import_error": TRITON_IMPORT_ERROR,
            "interpret": interpret_enabled(), "cuda_available": torch.cuda.is_available()}


class LazyKernel:
    """A Triton kernel jitted on first launch, separately for interpreted and compiled mode.

    `triton.jit` decides at decoration time between the interpreter and the compiler from TRITON_INTERPRET;
    deferring it lets the mode follow the environment at call time instead of at import time.
    """

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self._jitted: dict[bool, object] = {}

    def jitted(self):
        if triton is None:
            raise RuntimeError(f"Triton is not importable ({TRITON_IMPORT_ERROR})")
        mode = interpret_enabled()
        kernel = self._jitted.get(mode)
        if kernel is None:
            kernel = self._jitted[mode] = triton.jit(self.fn)
        return kernel

    def __getitem__(self, grid):
        return self.jitted()[grid]


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, whatever the current device is (multi-GPU processes)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch_options(num_warps: int) -> dict:
    """Compile options for a launch: none under the interpreter; otherwise num_warps and FP fusion (FMA) stated
    explicitly, so results do not change when Triton changes its default (3.10 turns it off)."""
    return {} if interpret_enabled() else {"num_warps": num_warps, "enable_fp_fusion": True}


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def block_for(n: int, default: int, minimum: int = 16) -> int:
    """Tile size for a row of n elements: `default` (compiled), capped to the row. Interpreted, tiles go up to
    64K elements, since the interpreter's cost is per program, not per element."""
    cap = 65536 if interpret_enabled() else default
    return max(minimum, min(cap, next_power_of_2(n)))


# ---- layout helpers every kernel shares ----------------------------------------------------------------------
def dense_from(x: torch.Tensor, dim: int) -> bool:
    """True when dims dim.. of x are laid out densely in C order (size-1 dims may have any stride)."""
    expected = 1
    for d in range(x.dim() - 1, dim - 1, -1):
        if x.size(d) != 1 and x.stride(d) != expected:
            return False
        expected *= x.size(d)
    return True


def row_strides(x: torch.Tensor, ndim: int) -> list[int]:
    """Strides of the first `ndim` dims, 0 for size-1 dims (their index is always 0)."""
    return [x.stride(d) if x.size(d) != 1 else 0 for d in range(ndim)]


def common_align(*values: int, cap: int = 16) -> int:
    """Largest power of two <= cap dividing every value (in elements)."""
    align = cap
    for v in values:
        while align > 1 and v % align:
            align //= 2
    return align


def inner_dense(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x, or a C-order copy when dims dim.. are not dense (what the kernels index)."""
    return x if dense_from(x, dim) else x.contiguous()
