"""The second wall: the worker decodes in a child process with an address-space limit and a
timeout; whatever happens there costs that one image, never the pool process."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless, RLELossless

from monai_bundle.scripts.dicom_image import load_dicom_image
from monai_bundle.scripts.pixel_guard import InvalidImageError
from tests.support.dicom_data import RG1_UNCR
from tests.support.hostile import encoded, j2k_siz_bomb
from tests.support.polling import wait_until
from tests.support.results import phantom_source
from worker.decoder import UNSAFE, DecodeLimits, Decoder, UnreadableFile

#: What the decoder process may grow to while it refuses a bomb (it starts at about 50 MiB).
REFUSING_PEAK_MIB = 200


@contextlib.contextmanager
def _decoder(**limits: object) -> Iterator[Decoder]:
    decoder = Decoder(DecodeLimits(**limits))  # type: ignore[arg-type]
    decoder.start()
    try:
        yield decoder
    finally:
        decoder.close()


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _small_image(tmp_path: Path) -> Path:
    path = tmp_path / "phantom.dcm"
    phantom_source(path)
    return path


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_the_decoder_process_gives_the_image_the_bundle_gives_in_every_encoding(
    tmp_path: Path, syntax: UID | None
) -> None:
    path = RG1_UNCR if syntax is None else encoded(tmp_path / "rg1.dcm", syntax)
    with _decoder() as decoder:
        image = decoder.load(path)
    assert image.dtype == np.float32
    assert np.array_equal(image, load_dicom_image(path))


@pytest.mark.parametrize("side", [25_000, 40_000])
def test_a_bomb_is_refused_by_the_checks_and_the_decoder_process_never_grows(
    tmp_path: Path, side: int
) -> None:
    bomb = j2k_siz_bomb(tmp_path / "bomb.dcm", side=side)
    with _decoder() as decoder:
        pid = decoder.pid
        assert pid is not None
        with pytest.raises(InvalidImageError, match=f"codestream is {side}x{side}") as caught:
            decoder.load(bomb)
        assert not str(caught.value).startswith(UNSAFE)
        assert decoder.pid == pid and decoder.restarts == 0  # a refusal costs no new process
        assert _peak_mib(pid) < REFUSING_PEAK_MIB


def test_an_image_beyond_the_memory_limit_is_not_decoded_safely_and_the_next_one_is(
    tmp_path: Path,
) -> None:
    small = _small_image(tmp_path)
    with _decoder(memory_mb=16) as decoder:  # RG1 needs about 100 MB, the phantom 2
        first = decoder.pid
        with pytest.raises(InvalidImageError) as caught:
            decoder.load(RG1_UNCR)
        assert str(caught.value) == (
            f"{UNSAFE}: it needs more memory than the decoder's limit of 16 MB"
        )
        assert decoder.restarts == 1 and decoder.pid not in (None, first)
        assert decoder.load(small).shape == (256, 256)


def test_a_file_the_decoder_cannot_read_is_the_file_s_fault_not_the_image_s(
    tmp_path: Path,
) -> None:
    with _decoder() as decoder:
        pid = decoder.pid
        with pytest.raises(UnreadableFile) as caught:
            decoder.load(tmp_path / "gone.dcm")
        assert caught.value.errno == errno.ENOENT
        assert str(tmp_path) not in str(caught.value)  # no path in a reason
        assert decoder.pid == pid


@pytest.fixture(name="fifo")
def fifo_fixture(tmp_path: Path) -> Path:
    """A named pipe: a decoder that opens it blocks until a writer comes, i.e. hangs."""
    path = tmp_path / "hangs.dcm"
    os.mkfifo(path)
    return path


def test_a_decode_that_hangs_is_stopped_after_the_timeout(tmp_path: Path, fifo: Path) -> None:
    with _decoder(timeout_s=0.5) as decoder:
        hung = decoder.pid
        assert hung is not None
        with pytest.raises(InvalidImageError) as caught:
            decoder.load(fifo)
        assert str(caught.value) == f"{UNSAFE}: the decoder took longer than 0.5 s"
        assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == "zombie"
        assert decoder.load(_small_image(tmp_path)).shape == (256, 256)


def _writer_once_read(fifo: Path) -> int | None:
    """A write end of the FIFO once some process opened it for reading (it is inside the
    decode, and stays blocked reading while the write end is open and empty)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ENXIO:  # no reader yet
            return None
        raise


def test_a_decoder_process_that_dies_mid_decode_costs_only_that_image(
    tmp_path: Path, fifo: Path
) -> None:
    with _decoder(timeout_s=60) as decoder:
        victim = decoder.pid
        assert victim is not None
        outcome: list[BaseException] = []

        def decode() -> None:
            try:
                decoder.load(fifo)
            except BaseException as err:
                outcome.append(err)

        thread = threading.Thread(target=decode)
        thread.start()
        writer = wait_until(lambda: _writer_once_read(fifo), 30, "the decoder to open the file")
        assert writer is not None
        try:
            os.kill(victim, signal.SIGKILL)  # what a decoder bug or the OOM killer does
            thread.join(timeout=30)
        finally:
            os.close(writer)
        assert [str(e) for e in outcome] == [f"{UNSAFE}: the decoder process died (SIGKILL)"]
        assert decoder.load(_small_image(tmp_path)).shape == (256, 256)


def test_a_decoder_process_lost_between_images_is_replaced(tmp_path: Path) -> None:
    with _decoder() as decoder:
        lost = decoder.pid
        assert lost is not None
        os.kill(lost, signal.SIGKILL)
        wait_until(lambda: psutil.Process(lost).status() == "zombie", 10, "the kill")
        assert decoder.load(_small_image(tmp_path)).shape == (256, 256)
        assert decoder.restarts == 1


def test_the_decoder_process_ignores_interrupts_and_exits_when_closed() -> None:
    decoder = Decoder()
    decoder.start()
    pid = decoder.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the whole process group: decodes go on
    os.kill(pid, signal.SIGTERM)
    assert decoder.load(RG1_UNCR).shape == (1955, 1841)
    assert decoder.pid == pid
    decoder.close()
    assert decoder.pid is None
    assert not psutil.pid_exists(pid)
