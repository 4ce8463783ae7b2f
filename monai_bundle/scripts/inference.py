"""Bundle inference: class probabilities for every image in ``dataset_dir``.

``InferenceRunner`` is what ``configs/inference.json`` runs.  For each input file it writes
``output_dir/<input file stem>.json``::

    {"probabilities": {"normal": p, "pneumonia": p, "COVID-19": p},
     "predicted": "<class>", "model_version": "..."}

A file that cannot be read as a radiograph is reported and skipped; the others go on, and the
run fails at the end when any file failed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .datasets import IMAGE_SUFFIXES, MASK_SUFFIX
from .networks import CoroNet, load_coronet_weights
from .preprocessing import is_dicom_file

logger = logging.getLogger(__name__)


def input_error(err: BaseException) -> ValueError | None:
    """The ``ValueError`` (e.g. ``InvalidImageError``) behind ``err``, if any.

    MONAI's ``Compose`` re-raises a transform's exception as ``RuntimeError("applying transform
    ...")`` chained to the original, so a bad image shows up wrapped.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ValueError):
            return seen
        seen = seen.__cause__
    return None


def list_inputs(dataset_dir: str | Path) -> list[Path]:
    """Images directly in ``dataset_dir`` (sorted): known suffixes and suffix-less DICOM files."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir is not a folder: {root}")
    found = []
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.stem.endswith(MASK_SUFFIX):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and is_dicom_file(path)):
            found.append(path)
    return found


def probabilities_record(
    probs: Sequence[float], class_names: Sequence[str], model_version: str
) -> dict[str, Any]:
    """The JSON written per image."""
    values = {name: float(p) for name, p in zip(class_names, probs, strict=True)}
    predicted = max(values, key=lambda name: values[name])
    return {"probabilities": values, "predicted": predicted, "model_version": model_version}


class InferenceRunner:
    """Runs the CoroNet network over a folder of DICOM, PNG or JPEG radiographs."""

    def __init__(
        self,
        network: nn.Module,
        preprocessing: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        inferer: Callable[..., torch.Tensor],
        postprocessing: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        dataset_dir: str | Path,
        output_dir: str | Path,
        class_names: Sequence[str],
        model_version: str,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.network = network
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.dataset_dir = Path(dataset_dir)
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.model_version = model_version
        self.device = torch.device(device)
        self.progress = progress
        if checkpoint is not None:
            if not isinstance(network, CoroNet):
                raise TypeError("checkpoint loading needs the CoroNet network")
            load_coronet_weights(network, checkpoint)
        self.network.to(self.device).eval()

    @torch.no_grad()
    def predict(self, source: Any) -> list[float]:
        """Class probabilities for one input (a path or a pydicom Dataset)."""
        data = dict(self.preprocessing({"image": source}))
        image = torch.as_tensor(data["image"]).to(self.device, torch.float32)
        data["pred"] = self.inferer(image[None], self.network)[0]
        out = self.postprocessing(data)
        return [float(p) for p in torch.as_tensor(out["pred"]).float().cpu()]

    def run(self) -> dict[str, dict[str, Any]]:
        """Write one JSON per input; raise RuntimeError listing the files that failed."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        inputs = list_inputs(self.dataset_dir)
        if not inputs:
            raise FileNotFoundError(f"no DICOM, PNG or JPEG files in {self.dataset_dir}")
        for path in tqdm(inputs, desc="inference", unit="img", disable=not self.progress):
            try:
                probs = self.predict(path)
            except (ValueError, RuntimeError) as err:
                cause = input_error(err)
                if cause is None:  # not a bad input: a real failure
                    raise
                failures[path.name] = str(cause)
                logger.error("%s: %s", path.name, cause)
                continue
            record = probabilities_record(probs, self.class_names, self.model_version)
            (self.output_dir / f"{path.stem}.json").write_text(json.dumps(record, indent=2))
            results[path.name] = record
        if failures:
            listing = "; ".join(f"{name}: {why}" for name, why in failures.items())
            raise RuntimeError(f"{len(failures)} of {len(inputs)} files failed: {listing}")
        return results
