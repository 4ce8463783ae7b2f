"""CoroNet networks: the Feature Pyramid AutoEncoder (FPAE), the residual tensor and the classifier.

Layout of the whole model (paper sections 2 and 3.2)::

    x (B x 1 x H x W, in [0, 1])
     |-- fpae_healthy   --> F_H(x) --+
     |-- fpae_pneumonia --> F_P(x) --+--> residual tensor (B x 3 x H x W, eq. 5-7)
                                                 |
                                           classifier (ResNet-18, 512 -> 3) --> logits (B x 3)

Parameter and buffer names follow the authors' released FPAE checkpoints and torchvision's
ResNet-18, so those ``state_dict`` files load with ``strict=True``.

Input sizes: the FPAE accepts any ``H x W``.  The pyramid convolution ``down`` (stride 2,
padding 1) gives levels of ``ceil(H / 2**k)``; each coarse level is upsampled one octave at a
time to the exact size of the next finer level.  When ``H`` and ``W`` are multiples of 8 this is
the same as upsampling by a factor of 2, as in the reference; otherwise nothing is padded or
cropped.  The latent is ``8 x ceil(H / 8) x ceil(W / 8)``.  The four levels are concatenated in
the order full, /2, /4, /8 (the reference does not state the order; it fixes which input
channels of ``conv_smooth1`` belong to which level).

Inference: in eval mode, when no gradient is needed, :meth:`FPAE.reconstruct` runs a folded path
(BatchNorm folded into the next convolution with an exact border correction, transposed
convolutions as plain convolutions, and on CPU oneDNN's fused conv+add+ReLU).  It computes the same
function as :meth:`FPAE.forward` up to float rounding; ``state_dict`` names are untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.nets import resnet18
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")
NUM_CLASSES = len(CLASS_NAMES)
FPAE_NUM_PARAMETERS = 53_659
FPAE_NUM_STATE_KEYS = 76
CORONET_NUM_PARAMETERS = 11_285_369
IMAGENET_NUM_CLASSES = 1000
PYRAMID_LEVELS = 4  # full resolution, /2, /4, /8

# (in, out) channels.  Encoder convs conv1..conv7; decoder convtrans1..convtrans7.
_ENCODER_CHANNELS: tuple[int, ...] = (1, 8, 16, 32, 24, 16, 12, 8)
_PYRAMID_CHANNELS = 32
_SMOOTH_CHANNELS: tuple[int, ...] = (_PYRAMID_CHANNELS, 16, 8, 8)
_DECODER_CHANNELS: tuple[int, ...] = (8, 12, 16, 24, 32, 16, 8, 1)
_FC_KEYS = ("fc.weight", "fc.bias")
_NUM_BATCHES_TRACKED = "num_batches_tracked"
_CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model", "network")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=True)


class FPAE(nn.Module):
    """Feature Pyramid AutoEncoder, one per class (Healthy, non-COVID pneumonia).

    Blocks are conv -> ReLU -> BatchNorm.  ``forward`` returns ``(reconstruction, latent)``, the
    latent being the ``bn7`` output of the coarsest (/8) pyramid level.
    """

    def __init__(self) -> None:
        super().__init__()
        ch = _ENCODER_CHANNELS
        self.bn0 = nn.BatchNorm2d(ch[0])
        self.conv1, self.bn1 = _conv3x3(ch[0], ch[1]), nn.BatchNorm2d(ch[1])
        self.conv2, self.bn2 = _conv3x3(ch[1], ch[2]), nn.BatchNorm2d(ch[2])
        self.conv3, self.bn3 = _conv3x3(ch[2], ch[3]), nn.BatchNorm2d(ch[3])
        self.down = _conv3x3(ch[3], ch[3], stride=2)
        self.conv4, self.bn4 = _conv3x3(ch[3], ch[4]), nn.BatchNorm2d(ch[4])
        self.conv5, self.bn5 = _conv3x3(ch[4], ch[5]), nn.BatchNorm2d(ch[5])
        self.conv6, self.bn6 = _conv3x3(ch[5], ch[6]), nn.BatchNorm2d(ch[6])
        self.conv7, self.bn7 = _conv3x3(ch[6], ch[7]), nn.BatchNorm2d(ch[7])
        sm = _SMOOTH_CHANNELS
        self.conv_smooth1 = _conv3x3(sm[0], sm[1])
        self.conv_smooth2 = _conv3x3(sm[1], sm[2])
        self.conv_smooth3 = _conv3x3(sm[2], sm[3])
        dc = _DECODER_CHANNELS
        self.convtrans1 = nn.ConvTranspose2d(dc[0], dc[1], kernel_size=3, stride=1, padding=1)
        self.convtrans2 = nn.ConvTranspose2d(dc[1], dc[2], kernel_size=3, stride=1, padding=1)
        self.convtrans3 = nn.ConvTranspose2d(dc[2], dc[3], kernel_size=3, stride=1, padding=1)
        self.convtrans4 = nn.ConvTranspose2d(dc[3], dc[4], kernel_size=3, stride=1, padding=1)
        self.convtrans5 = nn.ConvTranspose2d(dc[4], dc[5], kernel_size=3, stride=1, padding=1)
        self.convtrans6 = nn.ConvTranspose2d(dc[5], dc[6], kernel_size=3, stride=1, padding=1)
        self.convtrans7 = nn.ConvTranspose2d(dc[6], dc[7], kernel_size=3, stride=1, padding=1)

    @staticmethod
    def _block(conv: nn.Module, bn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """conv -> ReLU -> BN; returns (pre-activation, block output)."""
        pre = conv(x)
        return pre, bn(F.relu(pre))

    def _stem(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        _check_input(x)
        h = self.bn0(x)
        pre: list[Tensor] = []
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            p, h = self._block(conv, bn, h)
            pre.append(p)
        return h, pre

    def _branch(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Shared conv4..conv7 branch; returns (bn7 output, pre-activations of conv4..conv6)."""
        pre: list[Tensor] = []
        for conv, bn in (
            (self.conv4, self.bn4),
            (self.conv5, self.bn5),
            (self.conv6, self.bn6),
            (self.conv7, self.bn7),
        ):
            p, x = self._block(conv, bn, x)
            pre.append(p)
        return x, pre[:3]

    def _pyramid(self, h: Tensor) -> list[Tensor]:
        levels = [h]
        for _ in range(PYRAMID_LEVELS - 1):
            levels.append(self.down(levels[-1]))
        return levels

    def encode(self, x: Tensor) -> Tensor:
        """Latent z(x): the ``bn7`` output of the /8 level (eq. 4), ``B x 8 x H/8 x W/8``."""
        h, _ = self._stem(x)
        coarsest = self._pyramid(h)[-1]
        z, _ = self._branch(coarsest)
        return z

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(reconstruction in (0, 1), latent)`` for ``x`` of shape ``B x 1 x H x W``."""
        h, stem_pre = self._stem(x)
        levels = self._pyramid(h)
        sizes = [lvl.shape[-2:] for lvl in levels]
        merged: list[Tensor] = []
        branch_pre: list[Tensor] = []
        latent = h
        for index, level in enumerate(levels):
            out, pre = self._branch(level)
            if index == 0:
                branch_pre = pre
            latent = out
            for finer in range(index - 1, -1, -1):  # one octave at a time
                out = _upsample(out, sizes[finer])
            merged.append(out)
        m = torch.cat(merged, dim=1)
        m = self.conv_smooth3(self.conv_smooth2(self.conv_smooth1(m)))
        skips = (*reversed(branch_pre), *reversed(stem_pre))  # conv6, conv5, ..., conv1
        decoder = (
            self.convtrans1,
            self.convtrans2,
            self.convtrans3,
            self.convtrans4,
            self.convtrans5,
            self.convtrans6,
        )
        for convtrans, skip in zip(decoder, skips, strict=True):
            m = F.relu(convtrans(m) + skip)
        recon = torch.sigmoid(self.convtrans7(m) + x)
        return recon, latent

    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstruction only; uses the folded inference path when no gradient is needed."""
        if _can_fold(self, x):
            return _FoldedFPAE.from_fpae(self)(x)
        recon, _ = self(x)
        return recon


def _check_input(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"FPAE expects a B x 1 x H x W tensor, got shape {tuple(x.shape)}")


def _upsample(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def autoencoder_loss(model: FPAE, x: Tensor, lam: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 3-4 as implemented: ``MSE(F(x), x) + lam * MSE(z(x), z(F(x)))``.

    Both encoder passes carry gradients.  Returns ``(total, reconstruction term, latent term)``.
    """
    recon, z_x = model(x)
    recon_term = F.mse_loss(recon, x)
    latent_term = F.mse_loss(z_x, model.encode(recon))
    return recon_term + lam * latent_term, recon_term, latent_term


def residual_tensor(x: Tensor, recon_h: Tensor, recon_p: Tensor) -> Tensor:
    """Eq. 5-7: channels ``|X - F_H(X)|``, ``|X - F_P(X)|``, ``|2X - F_H(X) - F_P(X)|``."""
    if not (x.shape == recon_h.shape == recon_p.shape) or x.shape[1] != 1:
        raise ValueError(
            "residual_tensor expects three B x 1 x H x W tensors, got "
            f"{tuple(x.shape)}, {tuple(recon_h.shape)}, {tuple(recon_p.shape)}"
        )
    e_h = x - recon_h
    e_p = x - recon_p
    return torch.cat([e_h.abs(), e_p.abs(), (e_h + e_p).abs()], dim=1)


# --------------------------------------------------------------------------------------------
# Classifier (CIN)
# --------------------------------------------------------------------------------------------


def build_classifier(
    num_classes: int = NUM_CLASSES, pretrained_weights: str | Path | None = None
) -> nn.Module:
    """ResNet-18 with a ``512 -> num_classes`` fc; torchvision-compatible parameter names.

    ``pretrained_weights`` is a local torchvision-format ``state_dict`` (e.g. ImageNet); its
    1000-class fc is dropped when ``num_classes`` differs.  Nothing is downloaded.
    """
    net = resnet18(
        spatial_dims=2,
        n_input_channels=3,
        num_classes=num_classes,
        conv1_t_stride=2,
        bias_downsample=False,
    )
    if pretrained_weights is not None:
        load_classifier_weights(net, pretrained_weights)
    return net


def load_classifier_weights(net: nn.Module, path: str | Path) -> None:
    """Load a torchvision-format ResNet-18 ``state_dict`` from disk into ``net``.

    A consistent fc with another class count (e.g. ImageNet's 1000) is skipped and the model's
    freshly initialised fc kept; every other key must match in name and shape.
    """
    state = _read_state_dict(path)
    expected = net.state_dict()
    replace_fc = _is_other_head(state, expected)
    if replace_fc:
        logger.info(
            "classifier weights: %d-class fc in the file, keeping a new %d-class fc",
            state["fc.weight"].shape[0],
            expected["fc.weight"].shape[0],
        )
        state = {k: v for k, v in state.items() if k not in _FC_KEYS}
        expected = {k: v for k, v in expected.items() if k not in _FC_KEYS}
    _check_state_dict(state, expected, what="classifier weights", source=path)
    net.load_state_dict(_as_model_dtypes(state, expected), strict=not replace_fc)


def _is_other_head(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> bool:
    """True when the file's fc is a consistent ``512 -> K`` head with K other than the model's."""
    weight, bias = state.get("fc.weight"), state.get("fc.bias")
    want = expected["fc.weight"].shape
    return (
        weight is not None
        and bias is not None
        and weight.ndim == 2
        and weight.shape[1] == want[1]
        and tuple(bias.shape) == (weight.shape[0],)
        and weight.shape[0] != want[0]
    )


# --------------------------------------------------------------------------------------------
# CoroNet
# --------------------------------------------------------------------------------------------


class CoroNetOutput(NamedTuple):
    """Everything the CoroNet forward pass computes, for inspection."""

    logits: Tensor
    residual: Tensor
    recon_h: Tensor
    recon_p: Tensor


class CoroNet(nn.Module):
    """Two frozen FPAEs (Healthy, Pneumonia) -> residual tensor -> ResNet-18 classifier.

    The FPAEs never train and stay in eval mode, even after ``train()``.  Their calls are not
    wrapped in ``no_grad``, so a gradient still reaches the input (attribution maps need it).
    The FPAE modules passed in are frozen in place.
    """

    def __init__(
        self,
        fpae_healthy: FPAE | None = None,
        fpae_pneumonia: FPAE | None = None,
        classifier: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.fpae_healthy = fpae_healthy if fpae_healthy is not None else FPAE()
        self.fpae_pneumonia = fpae_pneumonia if fpae_pneumonia is not None else FPAE()
        self.classifier = classifier if classifier is not None else build_classifier()
        for fpae in (self.fpae_healthy, self.fpae_pneumonia):
            fpae.requires_grad_(False)
            fpae.eval()
        # oneDNN runs NHWC convolutions much faster on CPU; names and shapes are unchanged.
        self.classifier.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def train(self, mode: bool = True) -> CoroNet:
        """Set the classifier's mode; the FPAEs stay in eval mode."""
        super().train(mode)
        self.fpae_healthy.eval()
        self.fpae_pneumonia.eval()
        return self

    def forward_with_intermediates(self, x: Tensor) -> CoroNetOutput:
        """Return logits, residual tensor and both reconstructions for ``x`` (B x 1 x H x W)."""
        recon_h = self.fpae_healthy.reconstruct(x)
        recon_p = self.fpae_pneumonia.reconstruct(x)
        residual = residual_tensor(x, recon_h, recon_p)
        if residual.device.type == "cpu":
            residual = residual.contiguous(memory_format=torch.channels_last)
        return CoroNetOutput(self.classifier(residual), residual, recon_h, recon_p)

    def residuals(self, x: Tensor) -> Tensor:
        """The residual tensor (eq. 5-7) fed to the classifier, ``B x 3 x H x W``."""
        recon_h = self.fpae_healthy.reconstruct(x)
        recon_p = self.fpae_pneumonia.reconstruct(x)
        return residual_tensor(x, recon_h, recon_p)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``B x 3`` for ``x`` of shape ``B x 1 x H x W`` in [0, 1]."""
        return self.forward_with_intermediates(x).logits

    def load_fpae_checkpoints(self, healthy: str | Path, pneumonia: str | Path) -> None:
        """Load the authors' separate FPAE ``state_dict`` files, strictly."""
        load_fpae_weights(self.fpae_healthy, healthy)
        load_fpae_weights(self.fpae_pneumonia, pneumonia)


def load_fpae_weights(fpae: FPAE, path: str | Path) -> None:
    """Load one FPAE ``state_dict`` (the authors' format: 76 keys) with ``strict=True``."""
    state = _read_state_dict(path)
    expected = fpae.state_dict()
    _check_state_dict(state, expected, what="FPAE weights", source=path)
    fpae.load_state_dict(_as_model_dtypes(state, expected), strict=True)


def load_coronet_weights(net: CoroNet, path: str | Path) -> None:
    """Load a whole-CoroNet ``state_dict`` (fp16 or fp32 on disk) strictly; tensors become the
    model's dtypes."""
    state = _read_state_dict(path)
    expected = net.state_dict()
    _check_state_dict(state, expected, what="CoroNet weights", source=path)
    net.load_state_dict(_as_model_dtypes(state, expected), strict=True)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in ``module`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# Checkpoint helpers
# --------------------------------------------------------------------------------------------


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        wrapped = [k for k in _CHECKPOINT_WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(wrapped) != 1:
            raise ValueError(
                f"{path.name}: not a state_dict; top-level keys are {sorted(map(str, obj))[:8]}"
            )
        obj = obj[wrapped[0]]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path.name}: expected a mapping of parameter names to tensors")
    return {str(k): v for k, v in obj.items()}


def _check_state_dict(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str, source: str | Path
) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped key.

    A missing ``*.num_batches_tracked`` is tolerated (older torchvision files lack it).
    """
    missing = sorted(k for k in expected if k not in state and not k.endswith(_NUM_BATCHES_TRACKED))
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what} in {Path(source).name} do not match the model: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}, shape mismatches {shapes[:10]}"
            + (" (lists cut at 10)" if max(len(missing), len(unexpected), len(shapes)) > 10 else "")
        )


def _as_model_dtypes(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Cast each tensor to the dtype of the model's tensor of the same name (fp16 -> fp32)."""
    return {k: v.to(dtype=expected[k].dtype) for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# Folded FPAE inference path
# --------------------------------------------------------------------------------------------


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


def _can_fold(fpae: FPAE, x: Tensor) -> bool:
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
        _check_input(x)
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
            coarse = _upsample(coarse, level.shape[-2:])
            coarse = torch.cat([self._coarse_branch(level), coarse], dim=1)
        coarse = _upsample(coarse, x.shape[-2:])
        m = self.smooth1_coarse.add_(coarse, self.smooth1_full(full))
        for conv in self.smooth:
            m = conv(m)
        for conv, skip in zip(self.decoder[:-1], (p6, p5, p4, p3, p2, p1), strict=True):
            m = conv.add_relu_(m, skip)
        return torch.sigmoid_(self.decoder[-1](m).add_(x))
