"""Memory of a process as the kernel accounts it (``/proc/PID/status``), for bounded tests."""

from __future__ import annotations

from pathlib import Path

_KIB = 1024


def _field(pid: int, name: str) -> int:
    """The number of a ``/proc/PID/status`` line (kB for memory fields)."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise KeyError(f"{name} not in /proc/{pid}/status")


def rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS)."""
    return _field(pid, "VmRSS") * _KIB


def peak_rss(pid: int) -> int:
    """Largest resident set size since start or since :func:`reset_peak` (VmHWM), in bytes."""
    return _field(pid, "VmHWM") * _KIB


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (``clear_refs`` 5, Linux 4.0+, as root)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")


def threads(pid: int) -> int:
    """Number of threads of the process."""
    return _field(pid, "Threads")
