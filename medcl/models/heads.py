"""Heads that turn backbone stage maps into what the SSL losses compare.

* :class:`ProjectionMLP` -- global embedding of a stage (average pool -> MLP), the ``g1`` head of
  Chaitanya et al., "Contrastive learning of global and local features for medical image segmentation
  with limited annotations", NeurIPS 2020 (SimCLR-style, Chen et al. 2020). No BatchNorm by default.
* :class:`ConvProjection` -- dense (local) embedding of a decoder stage with 1x1x1 convolutions, the
  ``g2`` head of Chaitanya et al. 2020.
* :class:`VoCoHead` -- the multi-scale pooled projector of VoCo (Wu, Zhuang & Chen, "VoCo: A Simple-yet-
  Effective Volume Contrastive Learning Framework for 3D Medical Image Analysis", CVPR 2024): every
  encoder stage and the bottleneck are average-pooled, concatenated and projected by a 3-layer MLP whose
  hidden layers use batch statistics without affine parameters; base and random crops are then compared
  by cosine similarity (the loss lives in :mod:`medcl.losses`).
* :class:`ReconstructionHead` -- decoder features -> image channels (masked image modelling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["none", "batch", "layer"]


def global_pool(x: Tensor) -> Tensor:
    """``[B, C, D, H, W]`` -> ``[B, C]`` (mean over space); ``[B, C]`` is returned unchanged."""
    if x.ndim == 2:
        return x
    if x.ndim != 5:
        raise ValueError(f"expected [B, C] or [B, C, D, H, W], got shape {tuple(x.shape)}")
    return x.mean(dim=(2, 3, 4))


def _norm1d(kind: Norm, dim: int, batch_affine: bool = True, track: bool = True) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(dim, affine=batch_affine, track_running_stats=track)
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose none, batch or layer")


class ProjectionMLP(nn.Module):
    """Global projection head: (average pool) -> ``num_layers`` linear layers with ReLU in between.

    Args:
        in_dim: channels of the stage it reads (``backbone.stage_channels["bottleneck"]``).
        hidden_dim: width of the hidden layers.
        out_dim: embedding size.
        num_layers: linear layers (>= 1); 2 as in SimCLR / Chaitanya et al.
        norm: normalisation after each hidden linear layer: ``"none"`` (default), ``"batch"`` (SimCLR
            v2 / BYOL style; needs more than one sample per batch in training), ``"layer"``.

    Shapes:
        ``x [B, in_dim, D, H, W]`` or ``[B, in_dim]`` -> ``[B, out_dim]`` (not normalised; the InfoNCE
        function normalises).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 256, out_dim: int = 128, num_layers: int = 2, norm: Norm = "none"
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not (norm == "batch" and i < num_layers - 1)))
            if i < num_layers - 1:
                layers += [_norm1d(norm, dims[i + 1]), nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(global_pool(x))


class ConvProjection(nn.Module):
    """Dense projection head: ``num_layers`` 1x1x1 convolutions with ReLU in between.

    Args:
        in_channels: channels of the decoder stage it reads.
        hidden_channels: width of the hidden layers.
        out_channels: embedding size per voxel.
        num_layers: convolutions (>= 1); 2 as in Chaitanya et al.

    Shapes:
        ``[B, in_channels, D, H, W]`` -> ``[B, out_channels, D, H, W]`` (same grid, so the stage's stride
        still maps voxels to input coordinates).
    """

    def __init__(self, in_channels: int, hidden_channels: int = 64, out_channels: int = 64, num_layers: int = 2):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Conv3d(dims[i], dims[i + 1], kernel_size=1))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VoCoHead(nn.Module):
    """VoCo projector (Wu et al., CVPR 2024): multi-scale average pooling + 3-layer MLP.

    Args:
        in_channels: channels of each map it pools, e.g.
            ``[backbone.stage_channels[n] for n in (*backbone.encoder_stage_names, "bottleneck")]``.
        hidden_dim: width of the two hidden layers (2048 in the paper).
        out_dim: embedding size (2048 in the paper).
        norm: ``"batch"`` (as released: BatchNorm without affine parameters and without running
            statistics, i.e. batch statistics in train and eval) or ``"none"``.

    Shapes:
        ``maps``: a list of ``[N, C_i, D_i, H_i, W_i]`` (``N`` crops) or one ``[N, C, D, H, W]`` map ->
        ``[N, out_dim]``. With ``norm="batch"`` the statistics are over the ``N`` crops of the call, so
        embed base crops and random crops in one call, as the paper does.
    """

    def __init__(
        self, in_channels: Sequence[int] | int, hidden_dim: int = 2048, out_dim: int = 2048, norm: Norm = "batch"
    ) -> None:
        super().__init__()
        chans = [in_channels] if isinstance(in_channels, int) else list(in_channels)
        self.in_channels = chans
        in_dim = sum(chans)
        layers: list[nn.Module] = []
        for a, b in [(in_dim, hidden_dim), (hidden_dim, hidden_dim)]:
            layers += [nn.Linear(a, b), _norm1d(norm, b, batch_affine=False, track=False), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(hidden_dim, out_dim))
        self.mlp = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, maps: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(maps, Tensor):
            maps = [maps]
        if [m.shape[1] for m in maps] != self.in_channels:
            raise ValueError(f"VoCoHead expects maps with channels {self.in_channels}, got {[m.shape[1] for m in maps]}")
        return self.mlp(torch.cat([global_pool(m) for m in maps], dim=1))


class ReconstructionHead(nn.Module):
    """Decoder map -> image intensities (masked image modelling target), a 1x1x1 convolution.

    Args:
        in_channels: channels of the decoder stage it reads.
        out_channels: image channels to predict.
        stride: the stage's stride (``backbone.stage_strides[name]``); when > 1 the prediction is
            trilinearly upsampled to the input grid.

    Shapes:
        ``[B, in_channels, D / s, H / s, W / s]`` -> ``[B, out_channels, D, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, stride: int | Sequence[int] = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        self.stride = (stride,) * 3 if isinstance(stride, int) else tuple(int(s) for s in stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if any(s != 1 for s in self.stride):
            size = [n * s for n, s in zip(y.shape[2:], self.stride)]
            y = F.interpolate(y, size=size, mode="trilinear", align_corners=False)
        return y
