"""The Feature Pyramid AutoEncoder (FPAE) of CoroNet (paper section 2, eq. 3-4).

Parameter and buffer names follow the authors' released FPAE checkpoints, so those
``state_dict`` files load with ``strict=True``.

Input sizes: the FPAE accepts any ``H x W``.  The pyramid convolution ``down`` (stride 2,
padding 1) gives levels of ``ceil(H / 2**k)``; each coarse level is upsampled one octave at a
time to the exact size of the next finer level.  When ``H`` and ``W`` are multiples of 8 this is
the same as upsampling by a factor of 2, as in the reference; otherwise nothing is padded or
cropped.  The latent is ``8 x ceil(H / 8) x ceil(W / 8)``.  The four levels are concatenated in
the order full, /2, /4, /8 (the reference does not state the order; it fixes which input
channels of ``conv_smooth1`` belong to which level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FPAE_NUM_PARAMETERS = 53_659
FPAE_NUM_STATE_KEYS = 76
PYRAMID_LEVELS = 4  # full resolution, /2, /4, /8

# (in, out) channels.  Encoder convs conv1..conv7; decoder convtrans1..convtrans7.
_ENCODER_CHANNELS: tuple[int, ...] = (1, 8, 16, 32, 24, 16, 12, 8)
_PYRAMID_CHANNELS = 32
_SMOOTH_CHANNELS: tuple[int, ...] = (_PYRAMID_CHANNELS, 16, 8, 8)
_DECODER_CHANNELS: tuple[int, ...] = (8, 12, 16, 24, 32, 16, 8, 1)


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
        check_input(x)
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
                out = upsample(out, sizes[finer])
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
        """Reconstruction only, through :meth:`forward` (gradients kept).

        :func:`scripts.folded.reconstruct` computes the same, faster, when no gradient is
        needed.
        """
        recon, _ = self(x)
        return recon


def check_input(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"FPAE expects a B x 1 x H x W tensor, got shape {tuple(x.shape)}")


def upsample(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def autoencoder_loss(model: FPAE, x: Tensor, lam: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 3-4 as implemented: ``MSE(F(x), x) + lam * MSE(z(x), z(F(x)))``.

    Both encoder passes carry gradients.  Returns ``(total, reconstruction term, latent term)``.
    """
    recon, z_x = model(x)
    recon_term = F.mse_loss(recon, x)
    latent_term = F.mse_loss(z_x, model.encode(recon))
    return recon_term + lam * latent_term, recon_term, latent_term
