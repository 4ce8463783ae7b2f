"""The trust model: the abstention gate, the calibration and the age limit.

The gate is tried as a site would meet it: each kind of image the demo weights never saw
(``tests/support/ood.py``) goes through the bundle's DICOM reader and :meth:`Engine.assess`,
and one of them through ``coronet infer`` down to the SR, which must say "Not Evaluated" in
words and pass ``dciodvfy``.  The calibration is checked on held-out phantoms: temperature
scaling fitted on other images lowers their expected calibration error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset

import monai_bundle
from dicom_node.cli import main
from dicom_node.core.age import age_reasons, parse_age_string, patient_age_years
from monai_bundle.scripts.calibration import expected_calibration_error, reliability_bins
from monai_bundle.scripts.classes import CLASS_NAMES
from monai_bundle.scripts.dicom_image import load_dicom_image
from monai_bundle.scripts.phantoms import make_phantom
from monai_bundle.scripts.trust import (
    REFUSAL,
    SIGNALS,
    Outputs,
    batched_outputs,
    layout_score,
    load_trust_model,
)
from monai_bundle.scripts.trust_fit import fit, fit_temperature
from tests.support.dicom_tools import dciodvfy
from tests.support.ood import KINDS, write_ood_set
from worker.engine import Engine, load_engine
from worker.results.sr import read_sr

BUNDLE = Path(monai_bundle.__file__).resolve().parent
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "node.yaml"
#: Phantom seeds no training, fitting or other test uses.
HELD_OUT_SEED = 41_000


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    yield load_engine(BUNDLE, "cpu")


@pytest.fixture(scope="module")
def ood(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_ood_set(tmp_path_factory.mktemp("ood"))


@pytest.fixture(scope="module")
def held_out(engine: Engine) -> tuple[Outputs, np.ndarray]:
    """20 phantoms per class the model, the gate and the temperature never saw."""
    images, labels = [], []
    for label in CLASS_NAMES:
        for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + 20):
            images.append(engine.prepare(make_phantom(label, 256, seed).image))
            labels.append(CLASS_NAMES.index(label))
    return batched_outputs(engine.network, images, 30, progress=False), np.array(labels)


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_gate_refuses_each_kind_of_image_the_model_never_saw(
    engine: Engine, ood: dict[str, Path], kind: str
) -> None:
    image = engine.prepare(load_dicom_image(ood[kind], fallback_window=engine.fallback_window))
    analysis = engine.assess(image)
    assert not analysis.verdict.accepted, analysis.verdict.to_json()
    assert analysis.verdict.score > 1.0
    (reason,) = analysis.outcome.reasons  # type: ignore[union-attr]
    assert reason.startswith(REFUSAL) and "gate score" in reason


def test_the_gate_accepts_held_out_phantoms_at_the_stated_rate_and_they_stay_accurate(
    engine: Engine, held_out: tuple[Outputs, np.ndarray]
) -> None:
    result, labels = held_out
    verdicts = engine.trust.verdicts(result)
    accepted = np.array([v.accepted for v in verdicts])
    correct = result.logits.argmax(dim=1).numpy() == labels
    assert accepted.mean() >= 0.95, [v.exceeded for v in verdicts if not v.accepted]
    assert correct[accepted].mean() >= 0.90


def test_the_shipped_trust_model_belongs_to_the_shipped_weights(engine: Engine) -> None:
    trust = load_trust_model(BUNDLE / "models" / "trust.pt")
    assert trust.classes == len(CLASS_NAMES) and trust.acceptance == 0.975
    assert set(trust.thresholds) == set(SIGNALS)
    assert trust.info["validation_accepted"] >= 0.95
    assert trust.info["validation_ece_after"] < trust.info["validation_ece_before"]
    assert engine.algorithm.parameters["calibration_temperature"] == f"{trust.temperature:.4g}"


def test_a_missing_trust_model_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"configs/fit_trust\.json"):
        load_trust_model(tmp_path / "trust.pt")


def test_the_layout_score_prefers_a_bright_middle_between_dark_lungs() -> None:
    chest = torch.full((1, 1, 96, 96), 0.2)
    chest[..., 32:64] = 0.8
    inverted, flat = 1.0 - chest, torch.full((1, 1, 96, 96), 0.5)
    scores = layout_score(torch.cat([chest, inverted, flat]))
    assert scores[0] < scores[2] < scores[1]


def _outputs(features: torch.Tensor, logits: torch.Tensor, seed: int) -> Outputs:
    generator = torch.Generator().manual_seed(seed)
    count = features.shape[0]
    signals = {
        n: torch.rand(count, generator=generator) for n in SIGNALS if n != "feature_distance"
    }
    return Outputs(logits=logits, features=features, signals=signals)


def test_fitted_thresholds_accept_the_stated_share_of_fresh_in_distribution_data() -> None:
    """Gaussian classes in 16 dimensions: the fitted gate lets about 97.5 % of a fresh draw
    through and refuses points far from every class."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(3, 16, generator=generator) * 4

    def draw(count: int, seed: int) -> tuple[Outputs, torch.Tensor]:
        local = torch.Generator().manual_seed(seed)
        labels = torch.arange(count) % 3
        features = means[labels] + torch.randn(count, 16, generator=local)
        logits = F.one_hot(labels, 3).float() * 3 + torch.randn(count, 3, generator=local)
        return _outputs(features, logits, seed), labels

    train, train_labels = draw(3000, 1)
    validation, validation_labels = draw(3000, 2)
    model = fit(train, train_labels, validation, validation_labels, acceptance=0.975)
    fresh, _ = draw(6000, 3)
    accepted = np.mean([v.accepted for v in model.verdicts(fresh)])
    assert 0.96 <= accepted <= 0.99
    far = _outputs(torch.full((5, 16), 50.0), torch.zeros(5, 3), 4)
    assert not any(v.accepted for v in model.verdicts(far))
    assert all("feature_distance" in v.exceeded for v in model.verdicts(far))


def test_a_trust_model_survives_a_round_trip_through_its_file(tmp_path: Path) -> None:
    trust = load_trust_model(BUNDLE / "models" / "trust.pt")
    again = load_trust_model(trust.save(tmp_path / "trust.pt"))
    assert again.temperature == trust.temperature and again.thresholds == trust.thresholds
    assert torch.equal(again.precision, trust.precision)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def test_temperature_scaling_fitted_on_other_images_lowers_the_ece_of_held_out_phantoms(
    engine: Engine, held_out: tuple[Outputs, np.ndarray]
) -> None:
    result, labels = held_out
    before = expected_calibration_error(F.softmax(result.logits, dim=1).numpy(), labels)
    after = expected_calibration_error(engine.trust.probabilities(result.logits).numpy(), labels)
    assert after < before, (before, after)


def test_fit_temperature_recovers_the_temperature_of_overconfident_logits() -> None:
    """Labels drawn from softmax(z); logits reported as 3 z: the fitted T is about 3."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.randn(20000, 3, generator=generator) * 2
    labels = torch.multinomial(F.softmax(truth, dim=1), 1, generator=generator)[:, 0]
    assert fit_temperature(truth * 3, labels) == pytest.approx(3.0, rel=0.05)


def test_reliability_bins_count_every_image_and_a_perfect_model_has_no_error() -> None:
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    bins = reliability_bins(probabilities, np.array([0, 1, 1, 0]), bins=10)
    assert bins.counts.sum() == 4
    certain = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(certain, np.array([0, 1, 2, 1])) == 0.0


# --------------------------------------------------------------------------------------------
# Age
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "years"),
    [("045Y", 45.0), ("006M", 0.5), ("052W", 52 * 7 / 365.25), ("010D", 10 / 365.25),
     ("45Y", None), ("045y", 45.0), ("", None), ("abcd", None), (None, None)],
)  # fmt: skip
def test_age_strings(value: str | None, years: float | None) -> None:
    parsed = parse_age_string(value)
    assert parsed == pytest.approx(years) if years is not None else parsed is None


def _header(**attributes: str) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_the_age_comes_from_patient_age_else_from_the_birth_and_study_dates() -> None:
    assert patient_age_years(_header(PatientAge="030Y", PatientBirthDate="20200101")) == 30
    age = patient_age_years(_header(PatientBirthDate="20100601", StudyDate="20260601"))
    assert age == pytest.approx(16.0, abs=0.01)
    assert patient_age_years(_header(PatientBirthDate="20100601")) is None
    assert patient_age_years(_header(PatientBirthDate="20300101", StudyDate="20260101")) is None


def test_a_stated_age_under_the_minimum_is_a_reason_and_a_missing_age_is_not() -> None:
    (reason,) = age_reasons(_header(PatientAge="012Y"), 18)
    assert "12.0 years is below the model's minimum of 18 years" in reason
    assert age_reasons(_header(PatientAge="018Y"), 18) == []
    assert age_reasons(_header(), 18) == []
    assert age_reasons(_header(PatientAge="012Y"), None) == []


# --------------------------------------------------------------------------------------------
# Through coronet infer, to the SR
# --------------------------------------------------------------------------------------------


def test_coronet_infer_reports_a_retagged_ct_as_not_evaluated_in_words_with_the_scores(
    ood: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["infer", "--config", str(CONFIG), str(ood["CT_small"]), "--out", str(out)]
    assert main(argv) == 0
    stem = ood["CT_small"].stem
    summary = json.loads((out / f"{stem}.json").read_text())
    assert summary["predicted"] is None
    assert summary["gate"]["accepted"] is False and summary["gate"]["score"] > 1
    assert summary["unassessable_reasons"][0].startswith(REFUSAL)
    sr = read_sr(pydicom.dcmread(out / f"{stem}.sr.dcm"))
    assert sr.predicted is None
    assert any(r.startswith(REFUSAL) and "gate score" in r for r in sr.unassessable_reasons)
    assert "Trained on synthetic phantoms, not patient data" in sr.comments
    report = dciodvfy(out / f"{stem}.sr.dcm")
    assert not report.errors, report
