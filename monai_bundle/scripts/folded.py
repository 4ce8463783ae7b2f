"""The FPAE's folded inference path: the same function as :meth:`FPAE.forward`, faster.

In eval mode, when no gradient is needed, :func:`reconstruct` folds every BatchNorm into the
next convolution (with an exact correction on the borders that zero padding touches), runs the
stride-1 transposed convolutions as plain convolutions, and on CPU uses oneDNN's fused
conv+add+ReLU.  It equals ``FPAE.forward`` up to float rounding; ``state_dict`` names are
untouched.  Otherwise it falls back to :meth:`FPAE.reconstruct`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fpae import FPAE, PYRAMID_LEVELS, check_input, upsample


def reconstruct(fpae: FPAE, x: Tensor) -> Tensor:
    """``fpae``'s reconstruction of ``x``: folded when no gradient is needed, else plain."""
    if can_fold(fpae, x):
        return _FoldedFPAE.from_fpae(fpae)(x)
    return fpae.reconstruct(x)


def _mkldnn_fusion_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (
            ops is not None
            and hasattr(ops, "_convolution_pointwise_")
            and bool(torch.backends.mkldnn.is_available())
        )
    except (AttributeError, RuntimeError):  # op namespace missing in this build
        return False


_MKLDNN_FUSION = _mkldnn_fusion_available()


def can_fold(fpae: FPAE, x: Tensor) -> bool:
    """The folded path gives no gradients and needs BN running statistics (eval mode)."""
    if fpae.training:
        return False
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(p.requires_grad for p in fpae.parameters())


def _use_mkldnn(x: Tensor) -> bool:
    return _MKLDNN_FUSION and x.device.type == "cpu" and x.dtype == torch.float32


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``scale * x + shift`` per channel."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@dataclass(frozen=True)
class _FoldedConv:
    """A 3x3, padding-1 conv whose input affine (an eval BatchNorm) is folded into it.

    ``conv(scale * h + shift)`` with zero padding equals ``conv'(h)`` plus a correction on the
    first/last output rows and columns, where the padded taps would have seen ``shift``.
    ``edge`` holds ``sum_i W[o, i, ky, kx] * shift[i]`` (``C_out x 3 x 3``) for that correction.
    """

    weight: Tensor
    bias: Tensor
    stride: int
    edge: Tensor | None

    @classmethod
    def build(
        cls,
        weight: Tensor,
        bias: Tensor,
        stride: int = 1,
        affine: tuple[Tensor, Tensor] | None = None,
    ) -> _FoldedConv:
        edge = None
        if affine is not None:
            scale, shift = affine
            edge = (weight * shift[None, :, None, None]).sum(dim=1)
            bias = bias + edge.sum(dim=(1, 2))
            weight = weight * scale[None, :, None, None]
        weight = weight.contiguous(memory_format=torch.channels_last)
        return cls(weight, bias.contiguous(), stride, edge)

    def _fix_edges(self, out: Tensor, in_h: int, in_w: int) -> Tensor:
        if self.edge is None:
            return out
        edge = self.edge
        out_h, out_w = out.shape[-2:]
        # (output index, kernel tap) pairs whose tap falls in the zero padding.
        rows = [(0, 0)] + ([(out_h - 1, 2)] if (out_h - 1) * self.stride + 1 > in_h - 1 else [])
        cols = [(0, 0)] + ([(out_w - 1, 2)] if (out_w - 1) * self.stride + 1 > in_w - 1 else [])
        for y, ky in rows:
            out[:, :, y, :] -= edge[:, ky, :].sum(dim=-1)[None, :, None]
        for x, kx in cols:
            out[:, :, :, x] -= edge[:, :, kx].sum(dim=-1)[None, :, None]
        for y, ky in rows:
            for x, kx in cols:
                out[:, :, y, x] += edge[None, :, ky, kx]
        return out

    def __call__(self, x: Tensor, relu: bool = False) -> Tensor:
        if relu and self.edge is None and _use_mkldnn(x):
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, [1, 1], [self.stride] * 2, [1, 1], 1, "relu", [], ""
            )
        out = F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=1)
        out = self._fix_edges(out, x.shape[-2], x.shape[-1])
        return out.relu_() if relu else out

    def add_(self, x: Tensor, other: Tensor) -> Tensor:
        """``other + conv(x)``, written into ``other``."""
        if _use_mkldnn(x):
            torch.ops.mkldnn._convolution_pointwise_(
                other, x, self.weight, self.bias, [1, 1], [self.stride] * 2, [1, 1], 1, "add",
                None, None, [], None,
            )  # fmt: skip
        else:
            other.add_(F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=1))
        return self._fix_edges(other, x.shape[-2], x.shape[-1])

    def add_relu_(self, x: Tensor, other: Tensor) -> Tensor:
        """``relu(conv(x) + other)``, written into ``other``."""
        assert self.edge is None
        if _use_mkldnn(x):
            return torch.ops.mkldnn._convolution_pointwise_(
                other, x, self.weight, self.bias, [1, 1], [1, 1], [1, 1], 1, "add", None, "relu",
                [], "",
            )  # fmt: skip
        return other.add_(F.conv2d(x, self.weight, self.bias, padding=1)).relu_()


def _transposed_as_conv(convtrans: nn.ConvTranspose2d) -> tuple[Tensor, Tensor]:
    """A stride-1, padding-1 transposed conv is a conv with a flipped kernel, in/out swapped."""
    assert convtrans.bias is not None
    return convtrans.weight.flip(2, 3).transpose(0, 1), convtrans.bias


@dataclass(frozen=True)
class _FoldedFPAE:
    """Eval-mode FPAE reconstruction with BatchNorm folded into the following convolutions."""

    stem: tuple[_FoldedConv, _FoldedConv, _FoldedConv]
    down_first: _FoldedConv
    down: _FoldedConv
    conv4_full: _FoldedConv
    conv4: _FoldedConv
    branch: tuple[_FoldedConv, _FoldedConv, _FoldedConv]  # conv5, conv6, conv7
    smooth1_full: _FoldedConv  # conv_smooth1 on the full-resolution level's 8 channels
    smooth1_coarse: _FoldedConv  # conv_smooth1 on the 24 upsampled coarse channels
    smooth: tuple[_FoldedConv, _FoldedConv]  # conv_smooth2, conv_smooth3
    decoder: tuple[_FoldedConv, ...]  # convtrans1..7 as convs

    @classmethod
    @torch.no_grad()
    def from_fpae(cls, m: FPAE) -> _FoldedFPAE:
        bn = [_bn_affine(b) for b in (m.bn0, m.bn1, m.bn2, m.bn3, m.bn4, m.bn5, m.bn6, m.bn7)]

        def fold(conv: nn.Conv2d, affine: tuple[Tensor, Tensor] | None) -> _FoldedConv:
            assert conv.bias is not None
            return _FoldedConv.build(conv.weight, conv.bias, conv.stride[0], affine)

        scale7, shift7 = bn[7]
        coarse = PYRAMID_LEVELS - 1
        width = scale7.numel()
        smooth1 = m.conv_smooth1
        assert smooth1.bias is not None
        return cls(
            stem=(fold(m.conv1, bn[0]), fold(m.conv2, bn[1]), fold(m.conv3, bn[2])),
            down_first=fold(m.down, bn[3]),
            down=fold(m.down, None),
            conv4_full=fold(m.conv4, bn[3]),
            conv4=fold(m.conv4, None),
            branch=(fold(m.conv5, bn[4]), fold(m.conv6, bn[5]), fold(m.conv7, bn[6])),
            # bn7 commutes with bilinear upsampling (weights sum to 1), so it folds here.
            # conv_smooth1 is split by input channels, which saves concatenating 32 channels.
            smooth1_full=_FoldedConv.build(
                smooth1.weight[:, :width], smooth1.bias, 1, (scale7, shift7)
            ),
            smooth1_coarse=_FoldedConv.build(
                smooth1.weight[:, width:],
                torch.zeros_like(smooth1.bias),
                1,
                (scale7.repeat(coarse), shift7.repeat(coarse)),
            ),
            smooth=(fold(m.conv_smooth2, None), fold(m.conv_smooth3, None)),
            decoder=tuple(
                _FoldedConv.build(*_transposed_as_conv(ct))
                for ct in (
                    m.convtrans1,
                    m.convtrans2,
                    m.convtrans3,
                    m.convtrans4,
                    m.convtrans5,
                    m.convtrans6,
                    m.convtrans7,
                )
            ),
        )

    def _coarse_branch(self, level: Tensor) -> Tensor:
        """conv4..conv7 on a pyramid level, ReLU'd; bn7 is applied later (in conv_smooth1)."""
        h = self.conv4(level, relu=True)
        for conv in self.branch:
            h = conv(h, relu=True)
        return h

    def __call__(self, x: Tensor) -> Tensor:
        check_input(x)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        conv1, conv2, conv3 = self.stem
        p1 = conv1(x)
        p2 = conv2(p1.relu())
        p3 = conv3(p2.relu())
        r3 = p3.relu()
        conv5, conv6, conv7 = self.branch
        p4 = self.conv4_full(r3)
        p5 = conv5(p4.relu())
        p6 = conv6(p5.relu())
        full = conv7(p6.relu(), relu=True)
        # Coarse levels merged coarse-to-fine: upsampling is per channel, so concatenating
        # before each octave gives the same maps as upsampling each level on its own.
        half = self.down_first(r3)
        quarter = self.down(half)
        coarse = self._coarse_branch(self.down(quarter))
        for level in (quarter, half):
            coarse = upsample(coarse, level.shape[-2:])
            coarse = torch.cat([self._coarse_branch(level), coarse], dim=1)
        coarse = upsample(coarse, x.shape[-2:])
        m = self.smooth1_coarse.add_(coarse, self.smooth1_full(full))
        for conv in self.smooth:
            m = conv(m)
        for conv, skip in zip(self.decoder[:-1], (p6, p5, p4, p3, p2, p1), strict=True):
            m = conv.add_relu_(m, skip)
        return torch.sigmoid_(self.decoder[-1](m).add_(x))
