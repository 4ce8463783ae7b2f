"""CoroNet networks: FPAE layout and checkpoints, residual tensor, classifier, frozen AEs."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import count_macs
from monai_bundle.scripts.networks import (
    CORONET_NUM_PARAMETERS,
    FPAE,
    FPAE_NUM_PARAMETERS,
    FPAE_NUM_STATE_KEYS,
    CoroNet,
    autoencoder_loss,
    build_classifier,
    count_parameters,
    load_coronet_weights,
    load_fpae_weights,
    residual_tensor,
)

# The authors' FPAE, from the reference: (name, in, out); transposed weights are (in, out, 3, 3).
FPAE_CONVS = [
    ("conv1", 1, 8),
    ("conv2", 8, 16),
    ("conv3", 16, 32),
    ("down", 32, 32),
    ("conv4", 32, 24),
    ("conv5", 24, 16),
    ("conv6", 16, 12),
    ("conv7", 12, 8),
    ("conv_smooth1", 32, 16),
    ("conv_smooth2", 16, 8),
    ("conv_smooth3", 8, 8),
]
FPAE_TRANSPOSED = [
    ("convtrans1", 8, 12),
    ("convtrans2", 12, 16),
    ("convtrans3", 16, 24),
    ("convtrans4", 24, 32),
    ("convtrans5", 32, 16),
    ("convtrans6", 16, 8),
    ("convtrans7", 8, 1),
]
FPAE_BNS = [("bn0", 1), ("bn1", 8), ("bn2", 16), ("bn3", 32)]
FPAE_BNS += [("bn4", 24), ("bn5", 16), ("bn6", 12), ("bn7", 8)]
BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
RESNET18_CLASSIFIER_PARAMETERS = 11_178_051
RESNET18_IMAGENET_PARAMETERS = 11_689_512
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def expected_fpae_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, cin, cout in FPAE_CONVS:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, 3, 3), (cout,)
    for name, cin, cout in FPAE_TRANSPOSED:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cin, cout, 3, 3), (cout,)
    for name, channels in FPAE_BNS:
        shapes.update({f"{name}.{b}": (channels,) for b in BN_BUFFERS})
        shapes[f"{name}.num_batches_tracked"] = ()
    return shapes


def torchvision_resnet18_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of torchvision's resnet18().state_dict(), written out by hand."""

    def bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {f"{prefix}.{b}": (channels,) for b in BN_BUFFERS}
        out[f"{prefix}.num_batches_tracked"] = ()
        return out

    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            cin = inplanes if block == 0 else planes
            shapes[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            shapes.update(bn(f"{p}.bn1", planes))
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(bn(f"{p}.bn2", planes))
            if block == 0 and cin != planes:
                shapes[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                shapes.update(bn(f"{p}.downsample.1", planes))
        inplanes = planes
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 512), (num_classes,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(123, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


def randomise_batchnorm(module: ModuleT, seed: int = 0) -> ModuleT:
    """Non-trivial BN statistics, so that folding them into the convs is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) * 3.0 - 1.5)  # some negative
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return module


@pytest.fixture(scope="module")
def fpae() -> FPAE:
    torch.manual_seed(0)
    return randomise_batchnorm(FPAE()).eval()


@pytest.fixture(scope="module")
def coronet(fpae: FPAE) -> CoroNet:
    """Shared, read-only: eval mode, different BN statistics in the two FPAEs."""
    torch.manual_seed(1)
    net = CoroNet(copy.deepcopy(fpae), randomise_batchnorm(FPAE(), seed=5))
    return net.eval()


def tiny_classifier() -> nn.Module:
    """Stands in for the ResNet-18 where only gradient flow matters (a ResNet backward is slow)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("build", "total", "trainable"),
    [
        (FPAE, FPAE_NUM_PARAMETERS, FPAE_NUM_PARAMETERS),
        (build_classifier, RESNET18_CLASSIFIER_PARAMETERS, RESNET18_CLASSIFIER_PARAMETERS),
        (
            lambda: build_classifier(1000),
            RESNET18_IMAGENET_PARAMETERS,
            RESNET18_IMAGENET_PARAMETERS,
        ),
        (CoroNet, CORONET_NUM_PARAMETERS, RESNET18_CLASSIFIER_PARAMETERS),
        (
            lambda: CoroNet(classifier=build_classifier(1000)),
            RESNET18_IMAGENET_PARAMETERS + 2 * FPAE_NUM_PARAMETERS,
            RESNET18_IMAGENET_PARAMETERS,
        ),
    ],
    ids=["fpae", "resnet18-3", "resnet18-1000", "coronet", "coronet-1000"],
)
def test_parameter_counts(build: Callable[[], nn.Module], total: int, trainable: int) -> None:
    net = build()
    assert count_parameters(net) == total
    assert count_parameters(net, trainable_only=True) == trainable


def test_paper_parameter_totals() -> None:
    """11,285,369 with the 3-class head; the paper's 11.8M counts the 1000-class fc."""
    assert CORONET_NUM_PARAMETERS == 11_285_369
    assert CORONET_NUM_PARAMETERS == RESNET18_CLASSIFIER_PARAMETERS + 2 * FPAE_NUM_PARAMETERS
    assert round((RESNET18_IMAGENET_PARAMETERS + 2 * FPAE_NUM_PARAMETERS) / 1e6, 1) == 11.8


# ------------------------------------------------------------------------ FPAE checkpoints


def test_fpae_state_dict_matches_reference_names_and_shapes() -> None:
    state = FPAE().state_dict()
    assert len(state) == FPAE_NUM_STATE_KEYS == 76
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_fpae_shapes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_authors_fpae_checkpoints_load_strictly(
    tmp_path: Path, dtype: torch.dtype, wrapped: bool
) -> None:
    healthy = random_state(expected_fpae_shapes(), seed=1)
    pneumonia = random_state(expected_fpae_shapes(), seed=2)
    paths = []
    for name, state in (("healthy", healthy), ("pneumonia", pneumonia)):
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        paths.append(save({"state_dict": cast} if wrapped else cast, tmp_path / f"{name}.pt"))
    net = CoroNet()
    net.load_fpae_checkpoints(*paths)
    for fpae, state in ((net.fpae_healthy, healthy), (net.fpae_pneumonia, pneumonia)):
        loaded = fpae.state_dict()
        for key, value in state.items():
            assert loaded[key].dtype == value.dtype  # fp16 on disk -> fp32 in the model
            torch.testing.assert_close(loaded[key], value.to(dtype).to(value.dtype))
        assert not any(p.requires_grad for p in fpae.parameters())


def _drop(state: dict[str, Tensor], key: str) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: _drop(s, "conv3.weight"), "missing.*conv3.weight"),
        (lambda s: {**s, "conv8.weight": torch.zeros(1)}, "unexpected.*conv8.weight"),
        (
            lambda s: {
                ("deconv1.weight" if k == "convtrans1.weight" else k): v for k, v in s.items()
            },
            "missing.*convtrans1.weight",
        ),
        (lambda s: {**s, "down.weight": torch.zeros(32, 32, 1, 1)}, "down.weight.*file"),
        (lambda s: {**s, "convtrans4.weight": torch.zeros(32, 24, 3, 3)}, "convtrans4.weight"),
        (lambda s: {**s, "bn0.running_mean": torch.zeros(3)}, "bn0.running_mean"),
    ],
    ids=["missing", "unexpected", "renamed", "kernel-shape", "transposed-shape", "bn-shape"],
)
def test_bad_fpae_checkpoint_is_rejected(
    tmp_path: Path, mutate: Callable[[dict[str, Tensor]], dict[str, Tensor]], message: str
) -> None:
    path = save(mutate(random_state(expected_fpae_shapes())), tmp_path / "bad.pt")
    fpae = FPAE()
    before = {k: v.clone() for k, v in fpae.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_fpae_weights(fpae, path)
    for key, value in fpae.state_dict().items():
        assert torch.equal(value, before[key]), "a rejected checkpoint must change nothing"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, FileNotFoundError),
        ({"epoch": 3, "optimizer": {"lr": 0.1}}, ValueError),
        ([1, 2, 3], ValueError),
    ],
    ids=["missing-file", "not-a-state-dict", "not-a-mapping"],
)
def test_unreadable_weights_raise(tmp_path: Path, content: object, error: type[Exception]) -> None:
    path = tmp_path / "weights.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(error):
        load_fpae_weights(FPAE(), path)


# ----------------------------------------------------------------------------- FPAE forward


@pytest.mark.parametrize(
    ("batch", "height", "width"),
    [(1, 64, 64), (2, 128, 128), (3, 96, 128), (2, 64, 96), (1, 37, 53), (2, 9, 5), (1, 1, 1)],
)
def test_fpae_output_and_latent_shapes(fpae: FPAE, batch: int, height: int, width: int) -> None:
    x = torch.rand(batch, 1, height, width)
    with torch.no_grad():
        recon, latent = fpae(x)
    assert recon.shape == x.shape
    assert latent.shape == (batch, 8, math.ceil(height / 8), math.ceil(width / 8))
    assert bool(((recon > 0) & (recon < 1)).all())
    with torch.no_grad():
        torch.testing.assert_close(fpae.encode(x), latent)


@pytest.mark.parametrize("shape", [(2, 64), (1, 1, 64), (1, 3, 64, 64), (1, 2, 1, 64, 64)])
def test_fpae_rejects_non_grayscale_batches(fpae: FPAE, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        fpae(torch.rand(shape))


def spec_fpae_forward(m: FPAE, x: Tensor) -> tuple[Tensor, Tensor]:
    """The reference text written out step by step, with upsampling by a factor of 2."""

    def block(conv: nn.Module, bn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
        pre = conv(h)
        return pre, bn(F.relu(pre))

    h = m.bn0(x)
    p1, h = block(m.conv1, m.bn1, h)
    p2, h = block(m.conv2, m.bn2, h)
    p3, h = block(m.conv3, m.bn3, h)
    levels = [h, m.down(h)]
    levels += [m.down(levels[1])]
    levels += [m.down(levels[2])]
    outs, skips = [], []
    for k, level in enumerate(levels):
        q4, g = block(m.conv4, m.bn4, level)
        q5, g = block(m.conv5, m.bn5, g)
        q6, g = block(m.conv6, m.bn6, g)
        _, g = block(m.conv7, m.bn7, g)
        if k == 0:
            skips = [q6, q5, q4]
        latent = g
        for _ in range(k):
            g = F.interpolate(g, scale_factor=2, mode="bilinear", align_corners=False)
        outs.append(g)
    d = m.conv_smooth3(m.conv_smooth2(m.conv_smooth1(torch.cat(outs, 1))))
    for ct, skip in zip(
        (m.convtrans1, m.convtrans2, m.convtrans3, m.convtrans4, m.convtrans5, m.convtrans6),
        (*skips, p3, p2, p1),
        strict=True,
    ):
        d = F.relu(ct(d) + skip)
    return torch.sigmoid(m.convtrans7(d) + x), latent


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_fpae_follows_the_reference_text(fpae: FPAE, size: tuple[int, int]) -> None:
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        recon, latent = fpae(x)
        want_recon, want_latent = spec_fpae_forward(fpae, x)
    torch.testing.assert_close(recon, want_recon)
    torch.testing.assert_close(latent, want_latent)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1, 1, 64, 64), torch.float32),
        ((3, 1, 96, 128), torch.float32),
        ((2, 1, 37, 53), torch.float32),
        ((1, 1, 9, 5), torch.float32),
        ((1, 1, 2, 3), torch.float32),
        ((2, 1, 40, 24), torch.float64),  # not oneDNN: the generic path any device uses
    ],
)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "frozen"])
def test_folded_inference_path_matches_forward(
    fpae: FPAE, shape: tuple[int, ...], dtype: torch.dtype, mode: str
) -> None:
    m = FPAE().to(dtype)
    m.load_state_dict(fpae.state_dict())
    m.eval()
    x = torch.rand(shape, dtype=dtype)
    with torch.no_grad():
        want, _ = m(x)
    if mode == "inference_mode":
        with torch.inference_mode():
            got = m.reconstruct(x)
    elif mode == "no_grad":
        with torch.no_grad():
            got = m.reconstruct(x)
    else:  # grad enabled, but nothing asks for it
        m.requires_grad_(False)
        got = m.reconstruct(x)
        assert not got.requires_grad
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_reconstruct_keeps_gradients_when_asked(fpae: FPAE) -> None:
    x = torch.rand(1, 1, 32, 32, requires_grad=True)
    recon = fpae.reconstruct(x)
    assert recon.requires_grad
    recon.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_fpae_macs_match_the_architecture() -> None:
    """Hook-counted MACs (used by the benchmark) equal the layer-by-layer count."""
    h = w = 64
    full = h * w
    coarse = sum((h >> k) * (w >> k) for k in (1, 2, 3))
    k = 9
    stem = full * k * (1 * 8 + 8 * 16 + 16 * 32)
    down = coarse * k * 32 * 32
    branch = (full + coarse) * k * (32 * 24 + 24 * 16 + 16 * 12 + 12 * 8)
    smooth = full * k * (32 * 16 + 16 * 8 + 8 * 8)
    decoder = full * k * (8 * 12 + 12 * 16 + 16 * 24 + 24 * 32 + 32 * 16 + 16 * 8 + 8 * 1)
    assert count_macs(FPAE().eval(), torch.rand(1, 1, h, w)) == (
        stem + down + branch + smooth + decoder
    )


# ------------------------------------------------------------------------ loss and residual


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_autoencoder_loss_is_eq_3_4(fpae: FPAE, lam: float) -> None:
    m = FPAE()
    m.load_state_dict(fpae.state_dict())
    m.eval()  # fixed BN statistics, so the two passes below see the same network
    x = torch.rand(2, 1, 32, 32)
    total, recon_term, latent_term = autoencoder_loss(m, x, lam)
    recon, z = m(x)
    torch.testing.assert_close(recon_term, F.mse_loss(recon, x))
    torch.testing.assert_close(latent_term, F.mse_loss(z, m.encode(recon)))
    torch.testing.assert_close(total, recon_term + lam * latent_term)
    assert float(latent_term.detach()) > 0


def test_latent_term_trains_the_whole_fpae() -> None:
    """Both passes carry gradients: z(recon) reaches the decoder, z(x) the encoder."""
    torch.manual_seed(0)
    m = FPAE().train()
    _, _, latent_term = autoencoder_loss(m, torch.rand(2, 1, 32, 32))
    latent_term.backward()
    for name in ("conv1.weight", "conv7.weight", "down.weight", "convtrans1.weight"):
        grad = m.get_parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 64), (2, 96, 128), (3, 33, 17)])
def test_residual_tensor_is_eq_5_to_7(
    coronet: CoroNet, batch: int, height: int, width: int
) -> None:
    net = coronet
    x = torch.rand(batch, 1, height, width)
    with torch.no_grad():
        f_h, _ = net.fpae_healthy(x)
        f_p, _ = net.fpae_pneumonia(x)
        by_hand = torch.cat([(x - f_h).abs(), (x - f_p).abs(), (2 * x - f_h - f_p).abs()], 1)
        torch.testing.assert_close(residual_tensor(x, f_h, f_p), by_hand)
        torch.testing.assert_close(net.residuals(x), by_hand, atol=1e-5, rtol=0)
        out = net.forward_with_intermediates(x)
        torch.testing.assert_close(net.classifier(by_hand), out.logits, atol=1e-4, rtol=1e-4)
    assert out.logits.shape == (batch, 3)
    torch.testing.assert_close(out.residual, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.recon_h, f_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.recon_p, f_p, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "shapes",
    [((1, 1, 8, 8), (1, 1, 8, 8), (1, 1, 8, 9)), ((1, 2, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8))],
)
def test_residual_tensor_rejects_mismatched_inputs(shapes: tuple[tuple[int, ...], ...]) -> None:
    with pytest.raises(ValueError, match="residual_tensor"):
        residual_tensor(*(torch.rand(s) for s in shapes))


# ----------------------------------------------------------------------- frozen autoencoders


def test_fpaes_stay_frozen_in_eval_mode_and_pass_gradient_to_the_input(fpae: FPAE) -> None:
    net = CoroNet(copy.deepcopy(fpae), copy.deepcopy(fpae), tiny_classifier()).train()
    assert net.training and net.classifier.training
    for fpae in (net.fpae_healthy, net.fpae_pneumonia):
        assert not fpae.training
        assert not any(m.training for m in fpae.modules())
        assert not any(p.requires_grad for p in fpae.parameters())
    stats = {k: v.clone() for k, v in net.fpae_healthy.state_dict().items()}
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert float(x.grad.abs().sum()) > 0
    for key, value in net.fpae_healthy.state_dict().items():
        assert torch.equal(value, stats[key]), f"{key} changed in train mode"
    assert all(p.grad is None for p in net.fpae_healthy.parameters())
    assert all(p.grad is not None for p in net.classifier.parameters())


@pytest.mark.parametrize("requires_grad", [False, True])
def test_classifier_training_step_through_frozen_fpaes(
    coronet: CoroNet, requires_grad: bool
) -> None:
    """With an input that needs no gradient the folded FPAE path is used; results agree."""
    net = CoroNet(
        copy.deepcopy(coronet.fpae_healthy),
        copy.deepcopy(coronet.fpae_pneumonia),
        tiny_classifier(),
    ).train()
    x = torch.rand(2, 1, 32, 32, requires_grad=requires_grad)
    out = net.forward_with_intermediates(x)
    with torch.no_grad():
        want = net.fpae_healthy(x)[0]
    torch.testing.assert_close(out.recon_h, want, atol=1e-5, rtol=0)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in net.classifier.parameters())


@pytest.mark.parametrize("device", ["meta"])
def test_network_follows_its_device(device: str) -> None:
    """Nothing is pinned to the CPU: the whole forward runs on whatever device holds it."""
    with torch.device(device):
        net = CoroNet().eval()
    assert all(p.device.type == device for p in net.parameters())
    x = torch.rand(2, 1, 64, 64, device=device)
    with torch.inference_mode():
        out = net.forward_with_intermediates(x)
    assert all(t.device.type == device for t in out)
    assert out.logits.shape == (2, 3) and out.residual.shape == (2, 3, 64, 64)
    assert net(x).device.type == device


# ---------------------------------------------------------------------------- classifier


def test_monai_resnet18_has_torchvision_names() -> None:
    model = {k: tuple(v.shape) for k, v in build_classifier(1000).state_dict().items()}
    assert model == torchvision_resnet18_shapes(1000)


@pytest.mark.parametrize(
    ("fc_classes", "dtype", "with_tracked"),
    [(1000, torch.float32, True), (1000, torch.float16, False), (3, torch.float32, True)],
    ids=["imagenet", "imagenet-fp16-no-num_batches_tracked", "3-class"],
)
def test_torchvision_weights_load_into_classifier(
    tmp_path: Path, fc_classes: int, dtype: torch.dtype, with_tracked: bool
) -> None:
    state = random_state(torchvision_resnet18_shapes(fc_classes), seed=3)
    if not with_tracked:  # the original torchvision ImageNet file predates num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    on_disk = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    net = build_classifier(3, save(on_disk, tmp_path / "resnet18.pth"))
    loaded = net.state_dict()
    for key, value in on_disk.items():
        if key.startswith("fc.") and fc_classes != 3:
            continue
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype))
    assert loaded["fc.weight"].shape == (3, 512)
    assert loaded["conv1.weight"].dtype == torch.float32


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda s: _drop(s, "layer4.1.conv2.weight"), ValueError, "missing.*layer4.1.conv2"),
        (lambda s: {**s, "layer5.0.conv1.weight": torch.zeros(1)}, ValueError, "unexpected"),
        (lambda s: {**s, "conv1.weight": torch.zeros(64, 1, 7, 7)}, ValueError, "conv1.weight"),
        (lambda s: {**s, "fc.bias": torch.zeros(3)}, ValueError, "fc"),
    ],
    ids=["missing", "unexpected", "one-channel-stem", "fc-half-replaced"],
)
def test_mismatched_classifier_weights_are_rejected(
    tmp_path: Path,
    mutate: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    error: type,
    message: str,
) -> None:
    path = save(mutate(random_state(torchvision_resnet18_shapes(1000))), tmp_path / "bad.pth")
    with pytest.raises(error, match=message):
        build_classifier(3, path)


def test_missing_classifier_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        build_classifier(3, tmp_path / "absent.pth")


# ----------------------------------------------------------------------- whole checkpoint


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_whole_coronet_checkpoint_round_trip(coronet: CoroNet, tmp_path: Path, half: bool) -> None:
    source = coronet
    state = {
        k: (v.half() if half and v.is_floating_point() else v)
        for k, v in source.state_dict().items()
    }
    target = CoroNet(classifier=copy.deepcopy(coronet.classifier))
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    load_coronet_weights(target, save(state, tmp_path / "model.pt"))
    for key, value in target.state_dict().items():
        assert value.dtype == source.state_dict()[key].dtype
        torch.testing.assert_close(value, state[key].to(value.dtype))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        got, want = target.eval()(x), source(x)
    torch.testing.assert_close(got, want, atol=1e-2 if half else 1e-5, rtol=1e-2 if half else 0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: {**s, "classifier.extra": torch.zeros(1)}, "unexpected.*classifier.extra"),
        (lambda s: _drop(s, "fpae_pneumonia.bn7.bias"), "missing.*fpae_pneumonia.bn7.bias"),
    ],
    ids=["stray-key", "missing-key"],
)
def test_bad_whole_coronet_checkpoint_is_rejected(
    coronet: CoroNet,
    tmp_path: Path,
    mutate: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    message: str,
) -> None:
    path = save(mutate(dict(coronet.state_dict())), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=message):
        load_coronet_weights(copy.deepcopy(coronet), path)
