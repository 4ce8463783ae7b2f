"""dcmtk ``storescp`` as a PACS that receives our results, writing each object to a folder.

with running_storescp(tmp_path / "pacs") as pacs:
    ... destinations=[pacs.destination()] ...
    wait_until(lambda: pacs.received(), ...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from tests.support.dicom_tools import ToolError, echoscu
from tests.support.polling import wait_until
from tests.support.ports import free_port
from tests.support.processes import ChildProcess


@dataclass
class StoreSCP:
    """One ``storescp`` on 127.0.0.1 writing what it receives to ``folder``."""

    folder: Path
    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    process: ChildProcess | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = ChildProcess(
            ["storescp", "-aet", self.ae_title, "-od", str(self.folder), str(self.port)]
        )
        wait_until(self._answers, 30, "storescp to answer C-ECHO", interval=0.1)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if not self.process.alive():
            raise AssertionError(f"storescp exited:\n{self.process.text()}")
        try:
            echoscu(port=self.port, called_aet=self.ae_title)
        except ToolError:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)
            self.process = None

    def received(self) -> list[tuple[Path, Dataset]]:
        """The objects stored so far, read back (files still being written are left out)."""
        found: list[tuple[Path, Dataset]] = []
        for path in sorted(self.folder.iterdir()):
            try:
                found.append((path, pydicom.dcmread(path)))
            except (InvalidDicomError, OSError, EOFError, ValueError):
                continue
        return found

    def destination(self, name: str = "pacs") -> dict[str, Any]:
        """Configuration data of this SCP as a destination."""
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}


@contextlib.contextmanager
def running_storescp(folder: Path, **options: Any) -> Iterator[StoreSCP]:
    scp = StoreSCP(folder, **options).start()
    try:
        yield scp
    finally:
        scp.stop()
