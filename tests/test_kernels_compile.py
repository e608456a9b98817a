"""The kernels compile for a real GPU target (sm_90, Hopper) without a GPU, and their loads vectorise.

The interpreter accepts code that the compiler rejects (and says nothing about codegen), so on a machine with no
GPU this is the check that the compiled path type-checks. Triton's bundled ptxas turns the PTX into a cubin; no
driver is needed. Skipped when this Triton has no ahead-of-time compile API of the expected shape.
"""
import inspect
import re

import pytest

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as exc:  # pragma: no cover - depends on the Triton version
    pytest.skip(f"no ahead-of-time compile API in this Triton: {exc}", allow_module_level=True)

from kernels import masked_loss, rcl_features  # noqa: E402

if not hasattr(triton.language.standard._sum_combine, "cache_key"):     # an InterpretedFunction, not a JITFunction
    pytest.skip("Triton was imported with TRITON_INTERPRET=1: its library functions are interpreted-only",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # triton.jit must build JITFunctions here

FLOAT_ARGS = {"mask_weight", "grad_scale", "numel", "hw"}
TARGET = GPUTarget("cuda", 90, 32)


def compile_ptx(lazy, constexprs: dict, dtype: str = "fp32", num_warps: int = 4) -> str:
    """Compile a LazyKernel's function for sm_90: pointers to `dtype` (reductions/means fp32), 16-byte aligned."""
    fn = triton.jit(lazy.fn)
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(lazy.fn).parameters):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            fp32_only = name in ("mask_ptr", "partial_ptr", "part_ptr", "out_ptr", "means_ptr", "dyn_ptr",
                                 "scale_ptr", "gm_ptr", "gd_ptr")
            signature[name] = "*fp32" if fp32_only else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]        # what the launcher specialises for aligned tensors
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "enable_fp_fusion": True})
    except Exception as exc:
        if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
            pytest.skip(f"no ptxas: {exc}")
        raise
    return compiled.asm["ptx"]


def vector_loads(ptx: str) -> int:
    return len(re.findall(r"ld\.global[\w.:]*\.v[248]\.", ptx))


def scalar_loads(ptx: str) -> int:
    return sum(1 for line in ptx.splitlines()
               if "ld.global" in line and not re.search(r"ld\.global[\w.:]*\.v[248]\.", line))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_loss_kernel_compiles_and_vectorises(dtype):
    for official in (False, True):
        for has_noise in (False, True):
            ptx = compile_ptx(masked_loss.loss_fwd_kernel,
                              {"OFFICIAL": official, "HAS_NOISE": has_noise, "WRITE_GRAD": True, "BLOCK": 2048,
                               "ALIGN": 8}, dtype)
            assert vector_loads(ptx) > 0 and scalar_loads(ptx) == 0, "loss loads did not vectorise"
    compile_ptx(masked_loss.loss_fwd_kernel, {"OFFICIAL": False, "HAS_NOISE": False, "WRITE_GRAD": False,
                                              "BLOCK": 2048, "ALIGN": 1}, dtype)
    ptx = compile_ptx(masked_loss.scale_inplace_kernel, {"BLOCK": 4096, "ALIGN": 8}, dtype)
    assert re.search(r"st\.global[\w.:]*\.v[248]\.", ptx), "in-place scaling did not vectorise"


def test_sum_kernel_compiles():
    compile_ptx(masked_loss.sum_partials_kernel, {"BLOCK": 1024})


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_feature_kernels_compile_and_vectorise(dtype):
    ptx = compile_ptx(rcl_features.rf_partial_kernel, {"BLOCK": 1024, "ALIGN": 8}, dtype)
    assert vector_loads(ptx) > 0 and scalar_loads(ptx) == 0, "feature loads did not vectorise"
    compile_ptx(rcl_features.rf_finalize_kernel, {"F_BLOCK": 16, "NB_BLOCK": 8})
    for has_gm in (False, True):
        for has_gd in (False, True):
            ptx = compile_ptx(rcl_features.rf_backward_kernel,
                              {"HAS_GM": has_gm, "HAS_GD": has_gd, "BLOCK": 1024, "ALIGN": 8}, dtype)
            assert re.search(r"st\.global[\w.:]*\.v[248]\.", ptx), "gradient stores did not vectorise"
