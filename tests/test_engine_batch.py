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
from worker.results.outcome import Prediction

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


def test_a_batch_assesses_what_each_image_gets_alone(engine: Engine) -> None:
    images = _images(engine, 5)
    together = engine.assess_many(images)
    for image, batched in zip(images, together, strict=True):
        alone = engine.assess(image)
        assert batched.verdict.accepted == alone.verdict.accepted
        assert batched.verdict.score == pytest.approx(alone.verdict.score, rel=1e-4, abs=1e-4)
        assert isinstance(batched.outcome, Prediction) and isinstance(alone.outcome, Prediction)
        assert batched.outcome.predicted == alone.outcome.predicted
        for name in engine.class_names:
            expected = alone.outcome.probabilities[name]
            assert batched.outcome.probabilities[name] == pytest.approx(expected, abs=1e-5)
    assert engine.assess_many([]) == []


def test_explain_many_is_each_images_map(engine: Engine) -> None:
    images = _images(engine, 2)
    targets = [0, 2]
    maps = engine.explain_many(images, targets, "fast")
    assert len(maps) == 2
    for image, target, batched in zip(images, targets, maps, strict=True):
        alone = engine.explain(image, target, "fast")
        # A batch sums in another order: the masks agree to float32 noise, far below a colour.
        np.testing.assert_allclose(batched.heatmap, alone.heatmap, atol=2e-3)
        assert batched.informative == alone.informative
    with pytest.raises(InferenceError, match="one target per image"):
        engine.explain_many(images, [0], "fast")
