"""CoroNet: two FPAEs, the residual tensor and the classifier; weights in and out.

Layout of the whole model (paper sections 2 and 3.2)::

    x (B x 1 x H x W, in [0, 1])
     |-- fpae_healthy   --> F_H(x) --+
     |-- fpae_pneumonia --> F_P(x) --+--> residual tensor (B x 3 x H x W, eq. 5-7)
                                                 |
                                           classifier (ResNet-18, 512 -> K) --> logits (B x K)

The FPAE is :mod:`scripts.fpae`; at inference its reconstructions take the folded path of
:mod:`scripts.folded`.  Parameter and buffer names follow the authors' released FPAE
checkpoints and torchvision's ResNet-18, so those ``state_dict`` files load with ``strict=True``.
The number of classes K comes from the bundle config (:mod:`scripts.classes`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from monai.networks.nets import resnet18
from torch import Tensor, nn

from . import folded
from .classes import NUM_CLASSES
from .fpae import FPAE, FPAE_NUM_PARAMETERS, FPAE_NUM_STATE_KEYS, autoencoder_loss

logger = logging.getLogger(__name__)

__all__ = [
    "CORONET_NUM_PARAMETERS",
    "FPAE",
    "FPAE_NUM_PARAMETERS",
    "FPAE_NUM_STATE_KEYS",
    "CoroNet",
    "CoroNetOutput",
    "autoencoder_loss",
    "build_classifier",
    "count_parameters",
    "load_classifier_weights",
    "load_coronet_weights",
    "load_fpae_weights",
    "residual_tensor",
]

CORONET_NUM_PARAMETERS = 11_285_369
IMAGENET_NUM_CLASSES = 1000
_FC_KEYS = ("fc.weight", "fc.bias")
_NUM_BATCHES_TRACKED = "num_batches_tracked"
_CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model", "network")


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
        recon_h = folded.reconstruct(self.fpae_healthy, x)
        recon_p = folded.reconstruct(self.fpae_pneumonia, x)
        residual = residual_tensor(x, recon_h, recon_p)
        if residual.device.type == "cpu":
            residual = residual.contiguous(memory_format=torch.channels_last)
        return CoroNetOutput(self.classifier(residual), residual, recon_h, recon_p)

    def residuals(self, x: Tensor) -> Tensor:
        """The residual tensor (eq. 5-7) fed to the classifier, ``B x 3 x H x W``."""
        recon_h = folded.reconstruct(self.fpae_healthy, x)
        recon_p = folded.reconstruct(self.fpae_pneumonia, x)
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
