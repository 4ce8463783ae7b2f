"""Training loops for CoroNet: the two autoencoders, then the classifier on their residuals.

Stage 1 (paper eq. 3-4): each FPAE learns one class only (healthy or pneumonia) with
``MSE(F(x), x) + lambda * MSE(z(x), z(F(x)))``, Adam (lr 1e-4, weight decay 1e-3), real batches,
and the checkpoint kept is the one with the lowest *validation* loss.

Stage 2: both FPAEs frozen, the ResNet-18 classifier learns from the residual tensor with a
class-weighted cross-entropy (the authors used [2, 2, 250]), flips on non-COVID images, an
optional class-balanced sampler, and the checkpoint kept is the one with the best validation
macro sensitivity (mean per-class recall), so the scarce COVID-19 class counts as much as the
others.

Both loops are deterministic for a fixed seed on CPU, show tqdm progress bars, and save their
loss curves as PNG next to the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism
from torch import Tensor, nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm.auto import tqdm

from .classes import CLASS_NAMES
from .datasets import read_class_folders, read_covidx_split, split_items
from .metrics import evaluate_predictions
from .networks import FPAE, CoroNet, autoencoder_loss, build_classifier, load_fpae_weights

logger = logging.getLogger(__name__)

#: Cross-entropy weights of the authors' code for normal, pneumonia, COVID-19.
AUTHORS_CLASS_WEIGHTS: tuple[float, float, float] = (2.0, 2.0, 250.0)
#: Label index of each autoencoder's class.
AE_CLASSES: dict[str, int] = {"healthy": 0, "pneumonia": 1}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` picks the first GPU when there is one; ``cpu`` and ``cuda:N`` are taken as is."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} was asked for but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask for deterministic kernels (MONAI's helper)."""
    set_determinism(seed=seed)


def load_items(
    dataset_dir: str | Path, split_file: str | Path | None = None
) -> list[dict[str, Any]]:
    """Training items from a COVIDx split file (images under ``dataset_dir``) or, without one,
    from class folders ``dataset_dir/<class>/*``."""
    if split_file:
        return read_covidx_split(split_file, dataset_dir)
    return read_class_folders(dataset_dir)


def train_val_split(
    items: Sequence[Mapping[str, Any]],
    val_fraction: float,
    seed: int = 0,
    labels: Sequence[int] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "val": [...]}``, stratified and deterministic; ``labels`` keeps only
    those classes (an autoencoder learns one class).  Both parts must be non-empty."""
    chosen = [dict(i) for i in items if labels is None or int(i["label"]) in set(labels)]
    train, val = split_items(chosen, val_fraction, seed)
    if not train or not val:
        raise ValueError(
            f"need images for both training and validation; got {len(train)} and {len(val)} "
            f"from {len(chosen)} items (labels {list(labels) if labels is not None else 'all'})"
        )
    return {"train": train, "val": val}


def build_coronet(
    fpae_healthy: str | Path | None = None,
    fpae_pneumonia: str | Path | None = None,
    pretrained_weights: str | Path | None = None,
) -> CoroNet:
    """A CoroNet whose FPAEs come from stage-1 checkpoints (frozen) and whose classifier
    optionally starts from a torchvision-format ImageNet state dict on local disk."""
    healthy, pneumonia = FPAE(), FPAE()
    if fpae_healthy is not None:
        load_fpae_weights(healthy, fpae_healthy)
    if fpae_pneumonia is not None:
        load_fpae_weights(pneumonia, fpae_pneumonia)
    return CoroNet(healthy, pneumonia, build_classifier(pretrained_weights=pretrained_weights))


def _batch(data: Mapping[str, Any], device: torch.device) -> tuple[Tensor, Tensor]:
    images = torch.as_tensor(data["image"]).to(device=device, dtype=torch.float32)
    labels = torch.as_tensor(data["label"]).to(device=device, dtype=torch.long).view(-1)
    return images, labels


@dataclass
class History:
    """Per-epoch figures of one training run; written as JSON and plotted as PNG."""

    monitor: str
    mode: str  # "min" or "max"
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_metric: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_value: float = math.nan

    def improved(self, value: float) -> bool:
        if math.isnan(self.best_value):
            return True
        return value < self.best_value if self.mode == "min" else value > self.best_value

    def save(self, out_dir: Path, stem: str, title: str) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / f"{stem}_history.json", "png": out_dir / f"{stem}_loss.png"}
        paths["json"].write_text(json.dumps(asdict(self), indent=2))
        plot_history(self, paths["png"], title)
        return paths


def plot_history(history: History, path: Path, title: str) -> None:
    """Loss curves (and the monitored metric when it is not the loss) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history.train_loss) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, history.train_loss, marker="o", label="training loss")
    ax.plot(epochs, history.val_loss, marker="o", label="validation loss")
    if history.best_epoch >= 0:
        ax.axvline(history.best_epoch + 1, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    if history.monitor != "val_loss" and history.val_metric:
        twin = ax.twinx()
        twin.plot(epochs, history.val_metric, color="tab:green", marker="s", label=history.monitor)
        twin.set_ylabel(history.monitor)
        twin.set_ylim(0, 1.05)
        twin.legend(loc="upper right")
    ax.legend(loc="upper left" if history.monitor != "val_loss" else "upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_epoch(
    loader: Iterable[Mapping[str, Any]],
    loss_of: Callable[[Tensor, Tensor], Tensor],
    device: torch.device,
    desc: str,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
) -> float:
    """One pass over ``loader``; the mean of ``loss_of(images, labels)`` per image.

    With an ``optimizer`` every batch takes a step; without one, no gradients are kept.
    """
    total, count = 0.0, 0
    with torch.set_grad_enabled(optimizer is not None):
        for data in tqdm(loader, desc=desc, leave=False, disable=not progress):
            images, labels = _batch(data, device)
            loss = loss_of(images, labels)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += float(loss.detach()) * images.shape[0]
            count += images.shape[0]
    if count == 0:
        raise ValueError(f"{desc}: the data loader yielded no images")
    return total / count


class AutoencoderTrainer:
    """Trains one FPAE on its own class (eq. 3-4) and keeps the best-validation checkpoint."""

    def __init__(
        self,
        network: FPAE,
        train_loader: Iterable[Mapping[str, Any]],
        val_loader: Iterable[Mapping[str, Any]],
        output_dir: str | Path,
        checkpoint_name: str = "fpae.pt",
        epochs: int = 50,
        lr: float = 1e-4,
        weight_decay: float = 1e-3,
        lam: float = 1.0,
        device: str | torch.device = "auto",
        progress: bool = True,
        title: str = "FPAE",
    ) -> None:
        self.device = resolve_device(device)
        self.network = network.to(self.device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.output_dir = Path(output_dir)
        self.checkpoint = self.output_dir / checkpoint_name
        self.epochs = epochs
        self.lam = lam
        self.progress = progress
        self.title = title
        self.optimizer = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)

    def _epoch(self, loader: Iterable[Mapping[str, Any]], train: bool, desc: str) -> float:
        self.network.train(train)
        return run_epoch(
            loader,
            lambda images, _: autoencoder_loss(self.network, images, self.lam)[0],
            self.device,
            desc,
            self.optimizer if train else None,
            self.progress,
        )

    def validate(self) -> float:
        """Mean eq. 3-4 loss over the validation set, in eval mode."""
        return self._epoch(self.val_loader, False, "validation")

    def run(self) -> History:
        history = History(monitor="val_loss", mode="min")
        epochs = tqdm(range(self.epochs), desc=self.title, disable=not self.progress)
        for epoch in epochs:
            train_loss = self._epoch(self.train_loader, True, f"epoch {epoch + 1} train")
            val_loss = self._epoch(self.val_loader, False, f"epoch {epoch + 1} val")
            history.train_loss.append(train_loss)
            history.val_loss.append(val_loss)
            history.val_metric.append(val_loss)
            if history.improved(val_loss):
                history.best_epoch, history.best_value = epoch, val_loss
                save_state_dict(self.network, self.checkpoint)
            epochs.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
            logger.info(
                "%s epoch %d: train %.5g, val %.5g", self.title, epoch + 1, train_loss, val_loss
            )
        history.save(self.output_dir, self.checkpoint.stem, f"{self.title}: eq. 3-4 loss")
        return history


class ClassifierTrainer:
    """Trains the ResNet-18 on the residual tensor of two frozen FPAEs (CoroNet's CIN)."""

    def __init__(
        self,
        network: CoroNet,
        train_loader: Iterable[Mapping[str, Any]],
        val_loader: Iterable[Mapping[str, Any]],
        output_dir: str | Path,
        checkpoint_name: str = "model.pt",
        epochs: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        class_weights: Sequence[float] | None = AUTHORS_CLASS_WEIGHTS,
        class_names: Sequence[str] = CLASS_NAMES,
        device: str | torch.device = "auto",
        save_half: bool = False,
        progress: bool = True,
        title: str = "CoroNet classifier",
    ) -> None:
        self.device = resolve_device(device)
        self.network = network.to(self.device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.output_dir = Path(output_dir)
        self.checkpoint = self.output_dir / checkpoint_name
        self.epochs = epochs
        self.class_names = list(class_names)
        self.save_half = save_half
        self.progress = progress
        self.title = title
        weight = (
            None
            if class_weights is None
            else torch.tensor(list(class_weights), dtype=torch.float32)
        )
        if weight is not None and weight.numel() != len(self.class_names):
            raise ValueError(f"{weight.numel()} class weights for {len(self.class_names)} classes")
        self.loss_fn = nn.CrossEntropyLoss(
            weight=None if weight is None else weight.to(self.device)
        )
        self.optimizer = torch.optim.Adam(
            network.classifier.parameters(), lr=lr, weight_decay=weight_decay
        )

    def _train_epoch(self, desc: str) -> float:
        self.network.train()
        return run_epoch(
            self.train_loader,
            lambda images, labels: self.loss_fn(self.network(images), labels),
            self.device,
            desc,
            self.optimizer,
            self.progress,
        )

    def validate(self, desc: str = "validation") -> tuple[float, float, np.ndarray, np.ndarray]:
        """Validation loss, macro sensitivity, labels and probabilities."""
        labels, probs, total = predict(
            self.network, self.val_loader, self.device, desc, self.progress, self.loss_fn
        )
        report = evaluate_predictions(labels, probs, self.class_names)
        return total, report.macro_sensitivity, labels, probs

    def run(self) -> History:
        history = History(monitor="val_macro_sensitivity", mode="max")
        epochs = tqdm(range(self.epochs), desc=self.title, disable=not self.progress)
        for epoch in epochs:
            train_loss = self._train_epoch(f"epoch {epoch + 1} train")
            val_loss, macro_sens, _, _ = self.validate(f"epoch {epoch + 1} val")
            history.train_loss.append(train_loss)
            history.val_loss.append(val_loss)
            history.val_metric.append(macro_sens)
            if history.improved(macro_sens):
                history.best_epoch, history.best_value = epoch, macro_sens
                save_state_dict(self.network, self.checkpoint, half=self.save_half)
            epochs.set_postfix(
                train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", sens=f"{macro_sens:.3f}"
            )
            logger.info(
                "%s epoch %d: train %.5g, val %.5g, macro sensitivity %.4f",
                self.title, epoch + 1, train_loss, val_loss, macro_sens,
            )  # fmt: skip
        history.save(self.output_dir, self.checkpoint.stem, f"{self.title}: weighted cross-entropy")
        return history


@torch.no_grad()
def predict(
    network: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device,
    desc: str = "predict",
    progress: bool = True,
    loss_fn: nn.Module | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels, softmax probabilities (N x C) and the mean loss (nan without ``loss_fn``)."""
    network.eval()
    all_labels: list[np.ndarray] = []
    all_probs: list[np.ndarray] = []
    total, count = 0.0, 0
    for data in tqdm(loader, desc=desc, leave=False, disable=not progress):
        images, labels = _batch(data, device)
        logits = network(images)
        if loss_fn is not None:
            total += float(loss_fn(logits, labels)) * images.shape[0]
        count += images.shape[0]
        all_labels.append(labels.cpu().numpy())
        all_probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    if count == 0:
        raise ValueError(f"{desc}: the data loader yielded no images")
    mean_loss = total / count if loss_fn is not None else math.nan
    return np.concatenate(all_labels), np.concatenate(all_probs), mean_loss


def save_state_dict(module: nn.Module, path: Path, half: bool = False) -> None:
    """Write ``module``'s state_dict (floating tensors as fp16 when ``half``) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
        for k, v in module.state_dict().items()
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def make_sampler(
    items: Sequence[Mapping[str, Any]], balanced: bool, seed: int = 0
) -> WeightedRandomSampler | None:
    """A class-balanced sampler over ``items`` when ``balanced``, else None (plain shuffling)."""
    return balanced_sampler([int(i["label"]) for i in items], seed) if balanced else None


def balanced_sampler(labels: Sequence[int], seed: int = 0) -> WeightedRandomSampler:
    """Draw every class equally often (with replacement), for the scarce COVID-19 class."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    weights = [1.0 / counts[label] for label in labels]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        weights, num_samples=len(labels), replacement=True, generator=generator
    )


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    sampler: torch.utils.data.Sampler | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader with a seeded generator, so shuffling is the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=False,
    )
