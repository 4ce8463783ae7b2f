"""``coronet demo send``: chest radiographs into the demo PACS that ``coronet run`` started.

By default two studies go: a synthetic phantom CR of the kind the demo weights were trained on
(it comes back with findings and a heatmap) and pydicom-data's real adult PA chest CR RG1,
which the demo weights never saw (it comes back "Not Evaluated": the gate refuses it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicom_node.core.errors import ConfigError
from dicom_node.stack.plan import LOOPBACK
from monai_bundle.scripts.phantoms import make_phantom, phantom_dataset


def _demo_target(
    var_dir: Path, host: str | None, port: int | None, aet: str | None
) -> tuple[str, int, str]:
    state: dict[str, Any] = {}
    path = var_dir / "run" / "state.json"
    if port is None or aet is None:
        try:
            state = json.loads(path.read_text(encoding="utf-8")).get("orthanc") or {}
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"no running `coronet run` with a demo Orthanc found ({path}: {err}); "
                "give --port and --aet"
            ) from err
        if not state:
            raise ConfigError("`coronet run` runs without Orthanc; give --port and --aet")
    return (
        host or str(state.get("host", LOOPBACK)),
        int(port if port is not None else state["dicom_port"]),
        aet or str(state["aet"]),
    )


#: The demo phantom: a COVID-19 phantom (synthetic, not clinical) of a seed no training used.
DEMO_PHANTOM_LABEL = "COVID-19"
DEMO_PHANTOM_SEED = 20_261_201
DEMO_PHANTOM_SIZE = 512


def sample_radiograph() -> Path:
    """RG1_UNCR.dcm, a real adult PA chest CR from pydicom-data."""
    path = get_testdata_file("RG1_UNCR.dcm")
    if not isinstance(path, str):
        raise ConfigError("pydicom-data is not installed: pip install pydicom-data")
    return Path(path)


def demo_phantom(folder: Path) -> Path:
    """Write the demo phantom as a CR frontal chest into ``folder`` (once) and return it."""
    path = folder / "demo-phantom.dcm"
    if not path.is_file():
        phantom = make_phantom(DEMO_PHANTOM_LABEL, DEMO_PHANTOM_SIZE, DEMO_PHANTOM_SEED)
        folder.mkdir(parents=True, exist_ok=True)
        phantom_dataset(phantom).save_as(path, enforce_file_format=True)
    return path


def _expectation(path: Path, phantom: Path) -> str:
    if path == phantom:
        return " (a synthetic phantom like the demo weights' training data: findings and heatmap)"
    if path.name == "RG1_UNCR.dcm":
        return " (a real radiograph the demo weights never saw: a 'Not Evaluated' SR)"
    return ""


def send_demo(
    *,
    files: Sequence[Path],
    var_dir: Path,
    host: str | None,
    port: int | None,
    called_aet: str | None,
    calling_aet: str,
    keep_uids: bool,
) -> tuple[bool, str]:
    """C-STORE ``files`` (default: the demo phantom and RG1) into the demo PACS; return (ok,
    report)."""
    target_host, target_port, target_aet = _demo_target(var_dir, host, port, called_aet)
    phantom = demo_phantom(var_dir / "demo")
    paths = list(files) or [phantom, sample_radiograph()]
    datasets = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from err
        if not keep_uids:
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        datasets.append((path, ds))
    ae = AE(ae_title=calling_aet)
    for _, ds in datasets:
        syntaxes = [str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian]
        syntaxes.append(ImplicitVRLittleEndian)
        ae.add_requested_context(str(ds.SOPClassUID), list(dict.fromkeys(syntaxes)))
    where = f"{target_aet} at {target_host}:{target_port}"
    assoc = ae.associate(target_host, target_port, ae_title=target_aet)
    if not assoc.is_established:
        return False, f"cannot associate with {where}"
    lines, ok = [], True
    try:
        for path, ds in datasets:
            response = assoc.send_c_store(ds)
            status = int(response.Status) if response and "Status" in response else None
            ok = ok and status == 0
            shown = "no response" if status is None else f"0x{status:04X}"
            lines.append(f"sent {path.name}{_expectation(path, phantom)} to {where}: {shown}")
    finally:
        assoc.release()
    if ok:
        lines.append(
            "Orthanc routes each to the node; the results appear in the same study within a few "
            "seconds (CPU: the heatmap takes longest)."
        )
    return ok, "\n".join(lines)
