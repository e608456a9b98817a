"""The kernels dispatcher: backend setting, auto selection, forced paths, and the import without Triton."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from dr_train.losses import masked_flow_matching_loss as loss_reference
from dr_train.losses import relation_features as features_reference
from kernels import dispatch

REPO = Path(__file__).resolve().parent.parent
HAS_TRITON = dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"Triton not importable: {dispatch.TRITON_IMPORT_ERROR}")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2, 3, 2, 5, 7, generator=g)
    target = torch.randn(2, 3, 2, 5, 7, generator=g)
    mask = torch.rand(2, 2, 5, 7, generator=g)
    return pred, target, mask


def loss_and_grad(fn, pred, target, mask, mode="official"):
    p = pred.clone().requires_grad_()
    loss = fn(p, target, mask, 20.0, mode)
    loss.backward(torch.tensor(0.6))
    return loss, p.grad, type(loss.grad_fn).__name__


def features_and_grad(fn, pred):
    p = pred.clone().requires_grad_()
    m, d = fn(p)
    torch.autograd.backward([m, d], [torch.full_like(m, 0.3), torch.full_like(d, -1.2)])
    return m, d, p.grad, type(m.grad_fn).__name__


def test_setting_resolution(monkeypatch):
    assert kernels.get_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "Torch")
    assert kernels.get_backend() == "torch"
    kernels.set_backend("triton")
    assert kernels.get_backend() == "triton"            # set_backend wins over the environment
    with kernels.use_backend("auto"):
        assert kernels.get_backend() == "auto"
        with kernels.use_backend("torch"):
            assert kernels.get_backend() == "torch"
        assert kernels.get_backend() == "auto"
    assert kernels.get_backend() == "triton"
    kernels.set_backend(None)
    assert kernels.get_backend() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.get_backend()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.set_backend("fast")


def test_forced_torch_is_the_reference(monkeypatch):
    pred, target, mask = inputs()
    noise = torch.randn(pred.shape, generator=torch.Generator().manual_seed(11))
    if HAS_TRITON:                                       # the kernels must not even be called
        def boom(*a, **k):
            raise AssertionError("Triton path used")
        monkeypatch.setattr(kernels._masked_loss, "masked_flow_matching_loss_triton", boom)
        monkeypatch.setattr(kernels._relation_features, "relation_features_triton", boom)
    with kernels.use_backend("torch"):
        l1, g1, _ = loss_and_grad(kernels.masked_flow_matching_loss, pred, target, mask)
        m1, d1, gp1, _ = features_and_grad(kernels.relation_features, pred)
        lz = kernels.masked_flow_matching_loss_from_latents(pred, target, noise, mask)
    l2, g2, _ = loss_and_grad(loss_reference, pred, target, mask)
    m2, d2, gp2, _ = features_and_grad(features_reference, pred)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert torch.equal(m1, m2) and torch.equal(d1, d2) and torch.equal(gp1, gp2)
    assert torch.equal(lz, loss_reference(pred, target - noise, mask))


@needs_triton
@pytest.mark.parametrize("setting", ["triton", "auto"])
def test_triton_path_matches_reference(monkeypatch, setting):
    """Forced triton, and auto under TRITON_INTERPRET=1 on CPU tensors, run the kernels."""
    pred, target, mask = inputs(1)
    noise = torch.randn(pred.shape, generator=torch.Generator().manual_seed(11))
    monkeypatch.setattr(kernels, "masked_flow_matching_loss_reference", None)   # not used on this path
    monkeypatch.setattr(kernels, "relation_features_reference", None)
    assert kernels.backend("cpu")["resolved"] == "triton"
    with kernels.use_backend(setting):
        l1, g1, fn1 = loss_and_grad(kernels.masked_flow_matching_loss, pred, target, mask)
        m1, d1, gp1, fn2 = features_and_grad(kernels.relation_features, pred)
        lz = kernels.masked_flow_matching_loss_from_latents(pred, target, noise, mask)
    assert fn1 == "MaskedFlowMatchingLossFunctionBackward" and fn2 == "RelationFeaturesFunctionBackward"
    l2, g2, _ = loss_and_grad(loss_reference, pred, target, mask)
    m2, d2, gp2, _ = features_and_grad(features_reference, pred)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp1, gp2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lz, loss_reference(pred, target - noise, mask), rtol=1e-5, atol=0)


@needs_triton
def test_auto_without_driver_uses_torch_and_forced_triton_refuses(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    pred, target, mask = inputs(2)
    info = kernels.backend("cpu")
    assert info["resolved"] == "torch" and "TRITON_INTERPRET" in info["reason"]
    _, _, name = loss_and_grad(kernels.masked_flow_matching_loss, pred, target, mask)
    assert name != "MaskedFlowMatchingLossFunctionBackward"
    with kernels.use_backend("triton"):
        assert kernels.backend("cpu")["resolved"] == "error"
        with pytest.raises(ValueError, match="forced.*TRITON_INTERPRET=1"):
            kernels.masked_flow_matching_loss(pred, target, mask)
        with pytest.raises(ValueError, match="forced"):
            kernels.relation_features(pred)
    if not torch.cuda.is_available():
        usable, reason = dispatch.triton_usable("cuda")
        assert not usable and "CUDA is not available" in reason


@needs_triton
def test_unsupported_calls_fall_back_in_auto_and_refuse_when_forced():
    """A mask that requires grad: auto takes the reference (which differentiates the mask)."""
    pred, target, mask = inputs(3)
    mask = mask.clone().requires_grad_()
    loss = kernels.masked_flow_matching_loss(pred, target, mask, 10.0, "official")
    loss.backward()
    m2 = mask.detach().clone().requires_grad_()
    loss_reference(pred, target, m2, 10.0, "official").backward()
    assert torch.equal(mask.grad, m2.grad)
    with kernels.use_backend("triton"), pytest.raises(ValueError, match="mask requires grad"):
        kernels.masked_flow_matching_loss(pred, target, mask)
    noise = torch.randn(1, 3, 1, 1, 1)                # broadcasting noise: the kernel needs full shapes
    lz = kernels.masked_flow_matching_loss_from_latents(pred, target, noise, mask.detach())
    assert lz.grad_fn is None and torch.equal(lz, loss_reference(pred, target - noise, mask.detach()))


def test_mixed_devices_are_left_to_the_reference():
    assert dispatch.select("x", [torch.zeros(1), torch.zeros(1, device="meta")]) == "torch"


def test_backend_info_keys():
    info = kernels.backend()
    assert set(info) >= {"setting", "device", "resolved", "reason", "triton_version", "triton_import_error",
                         "interpret", "cuda_available"}
    assert info["setting"] == "auto"


def test_import_without_triton_falls_back():
    """A process where `import triton` fails: kernels imports, auto uses torch, forced triton refuses."""
    code = textwrap.dedent("""
        import os, sys
        sys.modules["triton"] = None            # makes `import triton` raise ImportError
        sys.modules["triton.language"] = None
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, kernels
        from dr_train.losses import masked_flow_matching_loss, relation_features
        info = kernels.backend("cpu")
        assert info["resolved"] == "torch" and info["triton_import_error"], info
        assert "triton" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
        p, t, m = torch.randn(1, 2, 2, 3, 3), torch.randn(1, 2, 2, 3, 3), torch.rand(1, 2, 3, 3)
        assert torch.equal(kernels.masked_flow_matching_loss(p, t, m, 5.0, "paper"),
                           masked_flow_matching_loss(p, t, m, 5.0, "paper"))
        assert all(torch.equal(a, b) for a, b in zip(kernels.relation_features(p), relation_features(p)))
        kernels.set_backend("triton")
        try:
            kernels.relation_features(p)
        except ValueError as e:
            assert "not importable" in str(e), e
        else:
            raise AssertionError("forced triton without Triton did not raise")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")
