"""The MONAI bundle as users run it: config ids, verify commands, inference, training."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from pydicom.data import get_testdata_file

from monai_bundle.scripts.datasets import CLASS_NAMES, radiograph_dataset, read_class_folders
from monai_bundle.scripts.networks import FPAE, CoroNet
from monai_bundle.scripts.phantoms import generate_dataset
from monai_bundle.scripts.training import (
    AutoencoderTrainer,
    ClassifierTrainer,
    make_loader,
    make_sampler,
    train_val_split,
)
from monai_bundle.scripts.transforms import RandFlipUnlessLabeld

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "monai_bundle"
CONFIGS = BUNDLE / "configs"
DEMO_WEIGHTS = BUNDLE / "models" / "model.pt"


def bundle_cmd(*args: str, **options: str) -> list[str]:
    """``python -m monai.bundle ARGS --key value ...``."""
    flags = [part for key, value in options.items() for part in (f"--{key}", value)]
    return [sys.executable, "-m", "monai.bundle", *args, *flags]


def run_ok(cmd: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out phantoms: a seed the demo weights were never trained on."""
    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, {name: 12 for name in CLASS_NAMES}, size=160, seed=777)
    return root


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 phantoms per class at the training phantoms' size, from a seed never trained on."""
    root = tmp_path_factory.mktemp("held_out")
    generate_dataset(root, {name: 40 for name in CLASS_NAMES}, size=256, seed=777, workers=2)
    return root


# ------------------------------------------------------------------ config contract


@pytest.mark.parametrize(
    "config_id",
    [
        "fpae_healthy",
        "fpae_pneumonia",
        "classifier",
        "network",
        "preprocessing",
        "inferer",
        "postprocessing",
        "class_names",
        "dataset_dir",
        "output_dir",
    ],
)
def test_inference_config_ids(config_id: str) -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    assert config_id in parser


def test_class_names_contract() -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    assert parser.get_parsed_content("class_names") == ["normal", "pneumonia", "COVID-19"]


@pytest.mark.parametrize(
    "config",
    ["inference.json", "train_autoencoder.json", "train_classifier.json", "evaluate.json"],
)
def test_configs_are_json(config: str) -> None:
    assert isinstance(json.loads((CONFIGS / config).read_text()), dict)


# ------------------------------------------------------------------ verify commands


def test_verify_metadata_offline() -> None:
    run_ok(
        bundle_cmd(
            "verify_metadata",
            meta_file=str(CONFIGS / "metadata.json"),
            filepath=str(CONFIGS / "metadata_schema.json"),
        )
    )


def test_verify_metadata_rejects_a_broken_file(tmp_path: Path) -> None:
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    result = subprocess.run(
        bundle_cmd(
            "verify_metadata", meta_file=str(broken), filepath=str(CONFIGS / "metadata_schema.json")
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "num_channels" in result.stderr


def test_verify_net_in_out_offline() -> None:
    run_ok(
        bundle_cmd(
            "verify_net_in_out",
            "network",
            meta_file=str(CONFIGS / "metadata.json"),
            config_file=str(CONFIGS / "inference.json"),
            n="16",
            device="cpu",
        ),
        PYTHONPATH=str(BUNDLE),
    )


# ------------------------------------------------------------------ inference


def test_bundle_inference_on_real_chest_cr(tmp_path: Path) -> None:
    """The README's command on RG1 in two encodings: same probabilities to 1e-4."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        path = get_testdata_file(name)
        assert path is not None
        shutil.copy(path, data / name)
    out = tmp_path / "out"
    run_ok(
        bundle_cmd(
            "run",
            bundle_root=str(BUNDLE),
            config_file=str(CONFIGS / "inference.json"),
            dataset_dir=str(data),
            output_dir=str(out),
        )
    )
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(results) == {"RG1_UNCR", "RG1_J2KR"}
    for record in results.values():
        probs = record["probabilities"]
        assert list(probs) == list(CLASS_NAMES)
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-5)
        assert record["predicted"] == max(probs, key=probs.get)
        assert "demo" in record["model_version"]
    for name in CLASS_NAMES:
        a = results["RG1_UNCR"]["probabilities"][name]
        b = results["RG1_J2KR"]["probabilities"][name]
        assert abs(a - b) < 1e-4


def test_bundle_inference_reports_bad_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    result = subprocess.run(
        bundle_cmd(
            "run",
            bundle_root=str(BUNDLE),
            config_file=str(CONFIGS / "inference.json"),
            dataset_dir=str(data),
            output_dir=str(tmp_path / "out"),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "broken.dcm" in result.stderr


# ------------------------------------------------------------------ demo weights


def test_demo_weights_file() -> None:
    assert DEMO_WEIGHTS.is_file()
    assert DEMO_WEIGHTS.stat().st_size <= 25 * 1024 * 1024
    state = torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True)
    assert set(state) == set(CoroNet().state_dict())


@pytest.mark.slow
def test_evaluation_of_demo_weights_on_held_out_phantoms(held_out: Path, tmp_path: Path) -> None:
    """evaluate.json on 120 phantoms the demo weights never saw: the report is complete, the
    accuracy is at least 90%, the gate accepts at least 95% of them, and temperature scaling
    (fitted on other images) lowers their expected calibration error."""
    out = tmp_path / "evaluation"
    run_ok(
        bundle_cmd(
            "run",
            bundle_root=str(BUNDLE),
            config_file=f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']",
            dataset_dir=str(held_out),
            output_dir=str(out),
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(metrics["support"].values()) == 120
    assert metrics["accuracy"] >= 0.90, metrics["confusion"]
    for png in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.txt").read_text()
    assert "Table 5" in report and "expected calibration error" in report
    trust = metrics["trust"]
    assert trust["gate_acceptance"] >= 0.95 and trust["accuracy_accepted"] >= 0.90
    assert trust["ece_after"] < trust["ece_before"], trust


# ------------------------------------------------------------------ training


def _loaders(items: list[dict[str, Any]], size: int, batch: int) -> tuple[Any, Any]:
    split = train_val_split(items, 0.25, seed=0)
    train = make_loader(radiograph_dataset(split["train"], size=size, cache=True), batch, True)
    val = make_loader(radiograph_dataset(split["val"], size=size, cache=True), batch)
    return train, val


@pytest.mark.slow
def test_autoencoder_training_lowers_validation_loss(phantoms: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    healthy = [i for i in read_class_folders(phantoms) if i["label"] == 0]
    train, val = _loaders(healthy, 64, 4)
    trainer = AutoencoderTrainer(
        FPAE(), train, val, tmp_path, "fpae_healthy.pt", epochs=3, lr=1e-3, progress=False
    )
    untrained = trainer.validate()
    history = trainer.run()
    assert min(history.val_loss) < untrained
    assert history.best_epoch == int(np.argmin(history.val_loss))
    assert (tmp_path / "fpae_healthy.pt").is_file()
    assert (tmp_path / "fpae_healthy_loss.png").read_bytes()[:4] == b"\x89PNG"
    saved = torch.load(tmp_path / "fpae_healthy.pt", weights_only=True)
    assert len(saved) == 76


@pytest.mark.slow
def test_classifier_training_keeps_best_macro_sensitivity(phantoms: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    train, val = _loaders(read_class_folders(phantoms), 64, 8)
    net = CoroNet()
    fpae_before = {k: v.clone() for k, v in net.fpae_healthy.state_dict().items()}
    trainer = ClassifierTrainer(
        net, train, val, tmp_path, "model.pt", epochs=2, lr=1e-3, progress=False, save_half=True
    )
    history = trainer.run()
    assert history.monitor == "val_macro_sensitivity"
    assert history.best_epoch == int(np.argmax(history.val_metric))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["classifier.fc.weight"].dtype == torch.float16
    for key, value in net.fpae_healthy.state_dict().items():  # the FPAEs stay frozen
        assert torch.equal(value, fpae_before[key]), key


def test_class_weighted_loss_uses_the_authors_weights() -> None:
    trainer = ClassifierTrainer(CoroNet(), [], [], "unused", progress=False)
    assert trainer.loss_fn.weight is not None
    assert trainer.loss_fn.weight.tolist() == [2.0, 2.0, 250.0]


@pytest.mark.parametrize(
    ("labels", "balanced", "expect_sampler"),
    [([0, 0, 0, 1, 2], True, True), ([0, 1, 2], False, False)],
)
def test_balanced_sampler(labels: list[int], balanced: bool, expect_sampler: bool) -> None:
    sampler = make_sampler([{"label": x} for x in labels], balanced, seed=1)
    assert (sampler is not None) == expect_sampler
    if sampler is not None:
        weights = sampler.weights.tolist()
        per_class = {
            x: sum(w for w, y in zip(weights, labels, strict=True) if y == x) for x in set(labels)
        }
        assert len({round(v, 6) for v in per_class.values()}) == 1


@pytest.mark.parametrize(("label", "changes"), [(0, True), (1, True), (2, False)])
def test_flips_skip_covid(label: int, changes: bool) -> None:
    image = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    flip = RandFlipUnlessLabeld(keys="image", prob=1.0)
    flip.set_random_state(0)
    out = flip({"image": image, "label": label})
    assert (not torch.equal(out["image"], image)) == changes


def test_train_val_split_needs_both_parts() -> None:
    with pytest.raises(ValueError, match="both training and validation"):
        train_val_split([{"image": "a.png", "label": 0}], 0.5, labels=[0])
