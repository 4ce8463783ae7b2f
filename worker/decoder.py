"""The worker's one decode path: a pre-started child process, with an address-space limit and a
timeout.

The bundle checks a file before decoding it (:mod:`monai_bundle.scripts.pixel_guard`): that is
the first wall.  This is the second: the decode itself (the bundle's ``load_dicom_image``, from
the spooled file to the float32 image) runs in a small child process that imports neither torch
nor the model, under ``RLIMIT_AS`` (its start-up size plus ``memory_mb``) and a wall-clock
``timeout_s``.  A decoder bug or a bomb the checks do not know then fails only that child: the
image is reported "could not be decoded safely" with the cause, a fresh child is started, and
the pool process and the rest of the study go on.

One :class:`Decoder` (one child) per pool process, started with the process, reused for every
image.  Protocol on the child's stdin and stdout: one JSON line per request (``path``,
``max_pixels``, ``fallback_window``); the answer is one JSON line, followed for an image by its
``rows x columns`` float32 values.  The child ignores SIGINT and SIGTERM (a worker's warm
shutdown lets running decodes finish) and exits when its stdin closes or its parent dies.

Run as ``python -m worker.decoder --memory-mb N`` by :class:`Decoder`, never by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import numpy as np

from monai_bundle.scripts.dicom_image import FallbackWindow, Image2D, load_dicom_image
from monai_bundle.scripts.pixel_guard import DEFAULT_MAX_PIXELS, InvalidImageError

logger = logging.getLogger(__name__)

__all__ = ["UNSAFE", "DecodeLimits", "Decoder", "UnreadableFile"]

#: How every reason from the second wall begins.
UNSAFE: Final = "could not be decoded safely"
#: Seconds a new child may take to import its libraries and say it is ready.
START_TIMEOUT_S: Final = 60.0
#: Native libraries the child loads before its memory limit is set, so they do not count.
_PRELOADED: Final = (
    "pydicom.pixels.decoders.pylibjpeg",
    "pydicom.pixels.decoders.pyjpegls",
    "pydicom.pixels.decoders.rle",
    "openjpeg",
    "libjpeg",
    "jpeg_ls",
)
_CHILD_ENV: Final = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_PR_SET_PDEATHSIG: Final = 1
_MIB: Final = 1 << 20


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode may use: pixels (checked before decoding), memory and time."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout_s: float = 60.0
    memory_mb: int = 2048
    fallback_window: FallbackWindow = "minmax"


class UnreadableFile(OSError):
    """The child could not read the file (missing, I/O error): the file's fault, not the
    image's; the caller may try again later."""


class DecoderError(Exception):
    """The child failed (died, hung, ran out of memory): the image could not be decoded safely."""


class Decoder:
    """One decoder child process (see the module docstring); :meth:`load` decodes one file."""

    def __init__(self, limits: DecodeLimits | None = None) -> None:
        self.limits = limits or DecodeLimits()
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self.restarts = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        """The child's process id, while one runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        """Start the child now (a no-op while one runs), so the first image does not wait."""
        with self._lock:
            self._ensure_started()

    def close(self) -> None:
        """Stop the child (it exits when its stdin closes)."""
        with self._lock:
            self._stop(kill=False)

    def __enter__(self) -> Decoder:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        process = self._process
        if process is not None and process.poll() is None:
            return process
        if process is not None:
            logger.warning(
                "decoder process %d had stopped (%s); starting a new one",
                process.pid, self._death(process),
            )  # fmt: skip
            self._stop(kill=True)
            self.restarts += 1
        argv = [sys.executable, "-m", "worker.decoder", "--memory-mb", str(self.limits.memory_mb)]
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env={**os.environ, **_CHILD_ENV},
        )
        self._process = process
        self._buffer.clear()
        try:
            ready = json.loads(self._read_line(process, time.monotonic() + START_TIMEOUT_S))
        except DecoderError as err:
            self._stop(kill=True)
            raise DecoderError(
                f"the decoder process did not start within {START_TIMEOUT_S:g} s ({err})"
            ) from err
        except ValueError as err:
            self._stop(kill=True)
            raise DecoderError(f"the decoder process did not start: {err}") from err
        logger.debug(
            "decoder process %d ready (%d MB at start, limit %d MB more)",
            process.pid, ready.get("base_mb", 0), self.limits.memory_mb,
        )  # fmt: skip
        return process

    def _stop(self, *, kill: bool) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if kill:
            process.kill()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    # ------------------------------------------------------------------ decoding

    def load(self, path: Path) -> Image2D:
        """The bundle's ``load_dicom_image(path)`` run in the child, within the limits.

        Raises :class:`InvalidImageError` with the reason: the bundle's own (header, pixel data,
        decoding), or ``could not be decoded safely: ...`` when the child exceeded its memory
        limit, took longer than the timeout or died; a fresh child is started then.  Raises
        :class:`UnreadableFile` (an ``OSError``) when the child cannot read the file.
        """
        with self._lock:
            try:
                return self._load(path)
            except (InvalidImageError, UnreadableFile):  # the image's or the file's fault
                raise
            except DecoderError as err:
                logger.warning("decoder process failed (%s); starting a new one", err)
                self._stop(kill=True)
                self.restarts += 1
                self._restart_quietly()
                raise InvalidImageError(f"{UNSAFE}: {err}") from err
            except BaseException:  # e.g. the task's time limit while waiting: never reuse
                self._stop(kill=True)
                raise

    def _restart_quietly(self) -> None:
        try:
            self._ensure_started()
        except DecoderError as err:  # the next load tries again
            logger.error("cannot start a new decoder process: %s", err)

    def _load(self, path: Path) -> Image2D:
        process = self._ensure_started()
        deadline = time.monotonic() + self.limits.timeout_s
        request = {
            "path": str(path),
            "max_pixels": self.limits.max_pixels,
            "fallback_window": self.limits.fallback_window,
        }
        self._send(process, json.dumps(request).encode() + b"\n")
        reply = json.loads(self._read_line(process, deadline))
        if not reply.get("ok"):
            if "errno" in reply:
                reason = f"the decoder cannot read the file: {reply['reason']}"
                raise UnreadableFile(reply["errno"], reason)
            if reply.get("unsafe"):
                raise DecoderError(str(reply.get("reason")))
            raise InvalidImageError(str(reply.get("reason", "could not be decoded")))
        rows, columns = (int(v) for v in reply["shape"])
        if rows * columns > self.limits.max_pixels or min(rows, columns) < 1:
            raise DecoderError(f"the decoder answered an impossible shape {rows}x{columns}")
        image = np.empty((rows, columns), dtype=np.float32)
        self._read_into(process, image.data.cast("B"), deadline)
        return image

    def _send(self, process: subprocess.Popen[bytes], data: bytes) -> None:
        assert process.stdin is not None
        try:
            process.stdin.write(data)
        except (BrokenPipeError, OSError):
            raise DecoderError(self._death(process)) from None

    def _death(self, process: subprocess.Popen[bytes]) -> str:
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "the decoder process stopped answering"
        if code < 0:
            return f"the decoder process died ({signal.Signals(-code).name})"
        return f"the decoder process died (exit status {code})"

    def _wait_readable(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        assert process.stdout is not None
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
            raise DecoderError(f"the decoder took longer than {self.limits.timeout_s:g} s")

    def _read_line(self, process: subprocess.Popen[bytes], deadline: float) -> bytes:
        stream = process.stdout
        assert stream is not None
        while b"\n" not in self._buffer:
            self._wait_readable(process, deadline)
            chunk = stream.read(65536)
            if not chunk:
                raise DecoderError(self._death(process))
            self._buffer.extend(chunk)
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        return bytes(line)

    def _read_into(
        self, process: subprocess.Popen[bytes], target: memoryview, deadline: float
    ) -> None:
        stream = process.stdout
        assert stream is not None
        filled = min(len(self._buffer), len(target))
        target[:filled] = self._buffer[:filled]
        del self._buffer[:filled]
        while filled < len(target):
            self._wait_readable(process, deadline)
            count = stream.readinto(target[filled:])  # type: ignore[attr-defined]
            if not count:
                raise DecoderError(self._death(process))
            filled += count


# ---------------------------------------------------------------------------------- the child


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _decode(request: dict[str, Any], memory_mb: int) -> tuple[dict[str, Any], Image2D | None]:
    try:
        image = load_dicom_image(
            Path(request["path"]),
            fallback_window=request.get("fallback_window", "minmax"),
            max_pixels=int(request.get("max_pixels", DEFAULT_MAX_PIXELS)),
        )
    except InvalidImageError as err:
        return {"ok": False, "reason": str(err)}, None
    except OSError as err:  # the file, not the image: the caller may try again later
        return {"ok": False, "errno": err.errno, "reason": err.strerror or str(err)}, None
    except MemoryError:
        reason = f"it needs more memory than the decoder's limit of {memory_mb} MB"
        return {"ok": False, "unsafe": True, "reason": reason}, None
    except Exception as err:  # a decoder plugin or pydicom failing in a way of its own
        return {"ok": False, "reason": f"could not be decoded: {type(err).__name__}: {err}"}, None
    image = np.ascontiguousarray(image, dtype=np.float32)
    return {"ok": True, "shape": list(image.shape)}, image


def serve(memory_mb: int) -> int:
    """The child's loop: set the limits, say ready, answer requests until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    warnings.simplefilter("ignore")  # pydicom's warnings may quote header values
    logging.disable(logging.WARNING)
    answers: IO[bytes] = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by a library goes to stderr, not into the protocol
    for name in _PRELOADED:
        try:
            __import__(name)
        except ImportError:
            continue
    base = _address_space()
    limit = base + memory_mb * _MIB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    answers.write(json.dumps({"ready": True, "base_mb": base // _MIB}).encode() + b"\n")
    answers.flush()
    for line in sys.stdin.buffer:
        reply, image = _decode(json.loads(line), memory_mb)
        answers.write(json.dumps(reply).encode() + b"\n")
        if image is not None:
            answers.write(image.data.cast("B"))
        answers.flush()
        del image
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.decoder")
    parser.add_argument("--memory-mb", type=int, required=True)
    args = parser.parse_args(argv)
    return serve(args.memory_mb)


if __name__ == "__main__":
    sys.exit(main())
