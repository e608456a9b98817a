"""Shared by the kernel tests: device/dtype cases (CPU interpreter fp32; CUDA fp32 and bf16), tolerances."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
CASES = [pytest.param(("cpu", torch.float32), id="cpu-fp32"),
         pytest.param(("cuda", torch.float32), id="cuda-fp32", marks=no_cuda),
         pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=no_cuda)]


@pytest.fixture(params=CASES)
def dev(request, monkeypatch):
    device, dtype = request.param
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return device, dtype


@pytest.fixture(autouse=True)
def _interpret_cpu(monkeypatch):
    if "TRITON_INTERPRET" not in os.environ:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def value_tol(dtype):
    # fp32 accumulation on both sides, from the same (possibly bf16) values
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-5)


def grad_close(a, b, dtype, bf16_rtol=2e-2):
    """Gradients: relative tolerance, and an absolute one scaled to the largest entry (gradients of a mean over
    ~1e6 elements are ~1e-4: fixed absolute tolerances would make the check vacuous)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = a.float(), b.float()
    scale = b.abs().max().item() or 1.0
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (bf16_rtol, 1e-3)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)
