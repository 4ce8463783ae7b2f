"""The engine's batched calls: several images through the network in one forward pass give what
each image gives alone; the attribution of several images is each image's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import monai_bundle
from dicom_node.core.errors import InferenceError
from monai_bundle.scripts.phantoms import CLASS_NAMES, make_phantom
from worker.engine import Engine, load_engine

BUNDLE = Path(monai_bundle.__file__).resolve().parent


@pytest.fixture(scope="module", name="engine")
def engine_fixture() -> Engine:
    return load_engine(BUNDLE, "cpu")


def _images(engine: Engine, count: int) -> list[torch.Tensor]:
    phantoms = [
        make_phantom(CLASS_NAMES[i % len(CLASS_NAMES)], size=256, seed=i).image
        for i in range(count)
    ]
    return engine.prepare_many(phantoms)


def test_a_batch_predicts_what_each_image_predicts_alone(engine: Engine) -> None:
    images = _images(engine, 5)
    together = engine.predict_many(images)
    for image, batched in zip(images, together, strict=True):
        alone = engine.predict(image)
        assert batched.predicted == alone.predicted
        for name in engine.class_names:
            assert batched.probabilities[name] == pytest.approx(alone.probabilities[name], abs=1e-5)
    assert engine.predict_many([]) == []


def test_explain_many_is_each_images_map(engine: Engine) -> None:
    images = _images(engine, 2)
    targets = [0, 2]
    maps = engine.explain_many(images, targets, "fast")
    assert len(maps) == 2
    alone = engine.explain(images[1], targets[1], "fast")
    assert np.asarray(maps[1].heatmap).shape == np.asarray(alone.heatmap).shape
    with pytest.raises(InferenceError, match="one target per image"):
        engine.explain_many(images, [0], "fast")
