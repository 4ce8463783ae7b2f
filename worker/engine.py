"""The CoroNet MONAI bundle, loaded once per process for the worker and ``coronet infer``.

The bundle's own ``configs/inference.json`` defines the network, the pre-processing, the
classes and the attribution presets (the config ids ``network``, ``preprocessing``,
``inferer``, ``postprocessing``, ``class_names``, ``classes``, ``attribution`` and
``checkpoint`` are the contract, and ``fallback_window`` when present), so the worker computes
exactly what ``python -m monai.bundle run --config_file configs/inference.json`` computes.
The worker decodes DICOM images in its decoder process (:mod:`worker.decoder`) with the
bundle's ``load_dicom_image`` and the bundle's ``fallback_window``, and hands the decoded
image to :meth:`Engine.prepare`, whose pre-processing then only resizes it.

The bundle's trust model (``trust``: ``models/trust.pt``, :mod:`monai_bundle.scripts.trust`)
is part of the contract too: :meth:`Engine.assess` gives calibrated probabilities only for
images its gate accepts; ``minimum_age_years`` is the model card's age limit and
``result_caveat`` what every result of these weights says in words (the demo weights': trained
on synthetic phantoms).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.bundle import ConfigParser
from pydicom.dataset import Dataset
from torch import nn

import monai_bundle
import monai_bundle.scripts
from dicom_node.core.errors import InferenceError
from monai_bundle.scripts.attribution import Explainer, Explanation, PerturbationConfig
from monai_bundle.scripts.classes import ModelClass, load_classes
from monai_bundle.scripts.dicom_image import FallbackWindow, Image2D
from monai_bundle.scripts.inference import input_error
from monai_bundle.scripts.networks import load_coronet_weights
from monai_bundle.scripts.training import resolve_device
from monai_bundle.scripts.trust import TrustModel, Verdict, outputs
from worker.results.outcome import AlgorithmInfo, Prediction, Unassessable

logger = logging.getLogger(__name__)

ALGORITHM_NAME = "CoroNet"
FALLBACK_WINDOWS: tuple[FallbackWindow, ...] = ("minmax", "percentile")
INFERENCE_CONFIG = Path("configs") / "inference.json"
METADATA = Path("configs") / "metadata.json"
TRUST_FILE = "trust.pt"
_PACKAGED_BUNDLE = Path(monai_bundle.__file__).resolve().parent


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _make_scripts_importable(bundle_dir: Path) -> None:
    """Let the config's ``scripts.*`` targets import, as ``monai.bundle run`` does.

    For the bundle shipped with this package, ``scripts`` is the already imported
    ``monai_bundle.scripts`` (one module, one set of classes); for another bundle folder its
    root goes on ``sys.path``.
    """
    if bundle_dir.resolve() == _PACKAGED_BUNDLE:
        sys.modules.setdefault("scripts", monai_bundle.scripts)
        for name, module in list(sys.modules.items()):
            if name.startswith("monai_bundle.scripts."):
                sys.modules.setdefault("scripts." + name.split(".", 2)[2], module)
    elif str(bundle_dir) not in sys.path:
        sys.path.insert(1, str(bundle_dir))


@dataclass(frozen=True)
class Analysis:
    """The model's view of one image: calibrated probabilities when the gate accepts it, else
    why not; the gate's verdict either way."""

    outcome: Prediction | Unassessable
    verdict: Verdict


@dataclass
class Engine:
    """A loaded CoroNet bundle: pre-processing, network, classes, attribution presets, trust
    model, version and weights."""

    network: nn.Module
    preprocessing: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    classes: tuple[ModelClass, ...]
    presets: Mapping[str, PerturbationConfig]
    image_size: int
    model_version: str
    algorithm: AlgorithmInfo
    device: torch.device
    trust: TrustModel
    minimum_age_years: float | None = None
    fallback_window: FallbackWindow = "minmax"
    _explainer: Explainer | None = field(default=None, init=False, repr=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def prepare(self, source: Image2D | Dataset | Path) -> torch.Tensor:
        """The model input ``1 x S x S`` for a decoded image (float32 HxW in [0, 1], as the
        bundle's ``load_dicom_image`` makes it), a DICOM dataset or an image file.

        Raises ``ValueError`` (the bundle's ``InvalidImageError``) for images it cannot use.
        """
        try:
            data = self.preprocessing({"image": source})
        except RuntimeError as err:  # MONAI's Compose wraps the transform's ValueError
            cause = input_error(err)
            if cause is None:
                raise InferenceError(f"pre-processing failed: {err}") from err
            raise cause from err
        return torch.as_tensor(data["image"]).to(self.device, torch.float32)

    def prepare_many(self, sources: Sequence[Image2D | Dataset | Path]) -> list[torch.Tensor]:
        """:meth:`prepare` for each source (MONAI's transforms work image by image)."""
        return [self.prepare(source) for source in sources]

    @torch.no_grad()
    def assess_many(self, images: Sequence[torch.Tensor]) -> list[Analysis]:
        """The gate's verdict and, when it accepts, the calibrated class probabilities for
        prepared images, in one forward pass of the network (a batch: the network is in eval
        mode, so each image's result does not depend on the others)."""
        if not images:
            return []
        try:
            self.network.eval()
            result = outputs(self.network, torch.stack(list(images)))
            verdicts = self.trust.verdicts(result)
            probs = self.trust.probabilities(result.logits).cpu().numpy().astype(np.float64)
        except (RuntimeError, ValueError) as err:
            raise InferenceError(f"the network failed: {err}") from err
        return [self._analysis(row, verdict) for row, verdict in zip(probs, verdicts, strict=True)]

    def assess(self, image: torch.Tensor) -> Analysis:
        """:meth:`assess_many` for one prepared image."""
        return self.assess_many([image])[0]

    def _analysis(self, probs: np.ndarray, verdict: Verdict) -> Analysis:
        if not verdict.accepted:
            return Analysis(Unassessable((verdict.reason(),)), verdict)
        values = {name: float(p) for name, p in zip(self.class_names, probs, strict=True)}
        predicted = self.class_names[int(np.argmax(probs))]
        return Analysis(Prediction(self.class_names, values, predicted), verdict)

    def _preset(self, preset: str) -> PerturbationConfig:
        try:
            return self.presets[preset]
        except KeyError:
            raise InferenceError(
                f"no attribution preset {preset!r}; the bundle has {sorted(self.presets)}"
            ) from None

    def explain(self, image: torch.Tensor, target: int, preset: str = "fast") -> Explanation:
        """The meaningful-perturbation heatmap of ``target`` for one prepared image, with the
        bundle's attribution ``preset`` (``default``: the paper's; ``fast``), its probabilities
        calibrated by the trust model's temperature."""
        return self.explain_many([image], [target], preset)[0]

    def explain_many(
        self, images: Sequence[torch.Tensor], targets: Sequence[int], preset: str = "fast"
    ) -> list[Explanation]:
        """:meth:`explain` for several prepared images of one size, optimised together in one
        batch (each gets the map it would get alone)."""
        if len(images) != len(targets):
            raise InferenceError("one target per image")
        config = self._preset(preset)
        if self._explainer is None:
            self._explainer = Explainer(self.network, self.trust.temperature)
        try:
            return self._explainer.explain_batch(list(images), list(targets), config)
        except RuntimeError as err:
            raise InferenceError(f"the attribution map failed: {err}") from err


def load_engine(
    bundle_dir: str | Path, device: str = "auto", weights: str | Path | None = None
) -> Engine:
    """Load the bundle in ``bundle_dir`` onto ``device`` (``auto``, ``cpu`` or ``cuda:N``).

    ``weights`` overrides the bundle's ``checkpoint`` (``models/model.pt``); its trust model
    is then the ``trust.pt`` in the same folder.
    """
    start = time.perf_counter()
    root = Path(bundle_dir)
    config_file, meta_file = root / INFERENCE_CONFIG, root / METADATA
    for path in (config_file, meta_file):
        if not path.is_file():
            raise InferenceError(f"not a CoroNet bundle: {path} is missing")
    torch_device = resolve_device(device)
    _make_scripts_importable(root)
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.read_meta(str(meta_file))
    parser["bundle_root"] = str(root)
    parser["device"] = f"$torch.device('{torch_device}')"
    checkpoint = (
        Path(weights) if weights is not None else Path(parser.get_parsed_content("checkpoint"))
    )
    if not checkpoint.is_file():
        raise InferenceError(f"weights file not found: {checkpoint}")
    if weights is not None:  # the trust model is fitted to its weights and lies next to them
        parser["trust_file"] = str(checkpoint.with_name(TRUST_FILE))
    network = parser.get_parsed_content("network")
    load_coronet_weights(network, checkpoint)
    network.eval()
    model_version = str(parser.get_parsed_content("model_version"))
    image_size = int(parser.get_parsed_content("image_size"))
    try:
        classes = load_classes(root)
    except (OSError, ValueError) as err:
        raise InferenceError(f"the bundle's classes are unusable: {err}") from err
    presets = dict(parser.get_parsed_content("attribution"))
    try:
        trust = parser.get_parsed_content("trust")
    except (OSError, ValueError, RuntimeError) as err:
        raise InferenceError(f"the bundle's trust model is unusable: {err}") from err
    if not isinstance(trust, TrustModel) or trust.classes != len(classes):
        raise InferenceError(f"the bundle's trust model does not fit its {len(classes)} classes")
    algorithm = AlgorithmInfo(
        name=ALGORITHM_NAME,
        version=model_version,
        weights_sha256=sha256_of(checkpoint),
        parameters={
            "input_size": str(image_size),
            "device": torch_device.type,
            "calibration_temperature": f"{trust.temperature:.4g}",
            "gate_acceptance": f"{trust.acceptance:g}",
        },
        caveat=str(parser.get_parsed_content("result_caveat", default="")).strip(),
    )
    minimum_age = parser.get_parsed_content("minimum_age_years", default=None)
    fallback_window = parser.get_parsed_content("fallback_window", default="minmax")
    if fallback_window not in FALLBACK_WINDOWS:
        raise InferenceError(f"the bundle's fallback_window {fallback_window!r} is unknown")
    engine = Engine(
        network=network,
        preprocessing=parser.get_parsed_content("preprocessing"),
        classes=classes,
        presets=presets,
        image_size=image_size,
        model_version=model_version,
        algorithm=algorithm,
        device=torch_device,
        trust=trust,
        minimum_age_years=None if minimum_age is None else float(minimum_age),
        fallback_window=cast(FallbackWindow, fallback_window),
    )
    logger.info(
        "loaded CoroNet %s (%s, weights %s...) on %s in %.1f s",
        model_version, checkpoint.name, algorithm.weights_sha256[:12], torch_device,
        time.perf_counter() - start,
    )  # fmt: skip
    return engine
