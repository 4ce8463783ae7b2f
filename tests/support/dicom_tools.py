"""Run the DICOM command-line checkers the tests rely on: dicom3tools and dcmtk.

API (all take a path to a DICOM Part 10 file):

- :func:`dciodvfy` runs ``dciodvfy`` (dicom3tools) and returns a :class:`DciodvfyReport`
  with the ``errors`` and ``warnings`` lines split out.  Tests assert
  ``report.errors == []``; the report's ``str()`` is the full output, for the failure
  message::

      report = dciodvfy(path)
      assert not report.errors, report

- :func:`dcentvfy` runs ``dcentvfy`` (dicom3tools) on several files and returns the lines in
  which it reports Patient, Study, Series or other entity attributes that disagree between
  them (a value that differs, an attribute one file lacks); tests assert it is empty.

- :func:`dsr2html` renders an SR with dcmtk ``dsr2html`` and returns the HTML;
  :func:`html_to_text` strips it to plain lines.  :func:`dsrdump` returns dcmtk's indented
  text dump of an SR content tree.

Each raises :class:`ToolError` when the tool cannot run or fails (dciodvfy excepted: its
findings are the result), also when it is not installed: ``make test`` installs every tool, so
a missing one is a failed set-up, never a reason to skip.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Seconds any one tool may run.
TOOL_TIMEOUT_S = 60

_ERROR_PREFIX = "Error - "
_WARNING_PREFIX = "Warning - "
#: dicom3tools files Accession Number under the Series entity for the CR, DX and SC IODs and
#: under the Study entity for SR, and says so for some orders of files even when the values
#: agree: a difference of its module tables, not of the data.
_ENTITY_CLASSIFICATION = "Different information entities for attribute - Element=<AccessionNumber>"


class ToolError(RuntimeError):
    """A command-line tool is missing, timed out or failed."""


@dataclass(frozen=True)
class DciodvfyReport:
    """Outcome of ``dciodvfy`` on one file: its ``Error`` and ``Warning`` lines."""

    path: Path
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str

    def __str__(self) -> str:
        return f"dciodvfy {self.path}:\n{self.output}"


def _run(argv: Sequence[str], *, check: bool) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise ToolError(f"{argv[0]} is not installed")
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise ToolError(f"{argv[0]} ran longer than {TOOL_TIMEOUT_S} s") from err
    if check and proc.returncode != 0:
        raise ToolError(
            f"{' '.join(argv)} exited with {proc.returncode}:\n{proc.stderr}{proc.stdout}"
        )
    return proc


def dciodvfy(path: str | Path) -> DciodvfyReport:
    """Validate ``path`` against its IOD (PS3.3) with dicom3tools ``dciodvfy``."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"no such file: {path}")
    proc = _run(["dciodvfy", str(path)], check=False)
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines()]
    errors = tuple(line for line in lines if line.startswith(_ERROR_PREFIX))
    warnings = tuple(line for line in lines if line.startswith(_WARNING_PREFIX))
    if proc.returncode != 0 and not errors:
        # Crashed or could not read the file: report it as an error, never as clean.
        errors = (f"{_ERROR_PREFIX}dciodvfy exited with {proc.returncode}",)
    return DciodvfyReport(path=path, errors=errors, warnings=warnings, output=output)


def dcentvfy(paths: Sequence[str | Path]) -> list[str]:
    """``dcentvfy``'s findings on ``paths``, in the given order: files of one entity (Patient,
    Study, Series) whose attributes for it disagree.  Empty when they agree."""
    for path in paths:
        if not Path(path).is_file():
            raise ToolError(f"no such file: {path}")
    proc = _run(["dcentvfy", *(str(p) for p in paths)], check=False)
    lines = [
        line.strip()
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and _ENTITY_CLASSIFICATION not in line
    ]
    if proc.returncode != 0 and not lines:
        lines = [f"{_ERROR_PREFIX}dcentvfy exited with {proc.returncode}"]
    return lines


def dsr2html(path: str | Path, *options: str) -> str:
    """HTML rendering of the SR at ``path`` by dcmtk ``dsr2html`` (extra ``options`` first)."""
    return _run(["dsr2html", *options, str(path)], check=True).stdout


def dsrdump(path: str | Path, *options: str) -> str:
    """Indented text dump of the SR content tree at ``path`` by dcmtk ``dsrdump``."""
    return _run(["dsrdump", *options, str(path)], check=True).stdout


_BLOCK_END = re.compile(r"(?i)<br\s*/?>|</(p|tr|h[1-6]|li|div|table|dt|dd)>")
_DROPPED = re.compile(r"(?is)<(script|style|head)\b.*?</\1>")
_TAG = re.compile(r"<[^>]+>")


def html_to_text(markup: str) -> list[str]:
    """Non-empty text lines of ``markup``, tags removed and entities decoded."""
    text = _DROPPED.sub("", markup)
    text = _BLOCK_END.sub("\n", text)
    text = html.unescape(_TAG.sub("", text))
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def storescu(
    paths: Sequence[str | Path],
    *,
    port: int,
    called_aet: str,
    calling_aet: str = "STORESCU",
    host: str = "127.0.0.1",
) -> str:
    """Send files with dcmtk ``storescu`` (C-STORE, PS3.4 B); returns its log.

    Raises :class:`ToolError` unless every file was stored with a success status.
    """
    # -R: propose exactly the SOP classes of the files (the defaults lack e.g. 3D SR).
    argv = ["storescu", "-R", "-aet", calling_aet, "-aec", called_aet, host, str(port)]
    proc = _run([*argv, *(str(p) for p in paths)], check=True)
    log = proc.stdout + proc.stderr
    if re.search(r"(?m)^[EF]: ", log):
        raise ToolError(f"storescu reported errors:\n{log}")
    return log


def echoscu(*, port: int, called_aet: str, host: str = "127.0.0.1") -> None:
    """Verify a DICOM peer with dcmtk ``echoscu`` (C-ECHO, PS3.4 A)."""
    _run(["echoscu", "-aec", called_aet, host, str(port)], check=True)


def ocr(image: str | Path) -> str:
    """The text Tesseract reads in a picture (PNG), as a person would read burned-in text."""
    return _run(["tesseract", str(image), "stdout", "--psm", "6"], check=True).stdout
