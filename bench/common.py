"""Small helpers shared by the benchmarks: timing, MAC counting, memory and a results table."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import psutil
import torch
from torch import nn
from tqdm import tqdm

_M_MMAP_MAX = -4  # glibc mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_KIB = 1024
_MIB = 1024 * 1024


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (_MIB if sys.platform == "darwin" else _KIB)


def current_rss_mib() -> float:
    """Current resident set size of this process, in MiB."""
    return psutil.Process().memory_info().rss / _MIB


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and not hand freed memory back.

    Big tensors otherwise come from fresh ``mmap`` pages, and each use page-faults them in again.
    Returns False where this is not glibc.  Affects the whole process, so every model timed in
    it benefits equally; peak RSS may grow.
    """
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one ``module(*inputs)`` call, counted on Conv/ConvTranspose/Linear.

    Conv: output elements x (C_in / groups) x kernel area.  Transposed conv: input elements x
    (C_out / groups) x kernel area.  Linear: output elements x in_features.  Biases, norms and
    element-wise ops are not counted.
    """
    total = 0

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features
        elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
            kernel = int(torch.tensor(mod.kernel_size).prod())
            total += args[0].numel() * (mod.out_channels // mod.groups) * kernel
        elif isinstance(mod, nn.modules.conv._ConvNd):
            kernel = int(torch.tensor(mod.kernel_size).prod())
            total += out.numel() * (mod.in_channels // mod.groups) * kernel

    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.inference_mode():
            module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def time_interleaved(
    cases: Mapping[str, Callable[[], object]],
    iters: int,
    warmup: int = 2,
    desc: str = "timing",
) -> dict[str, list[float]]:
    """Run each case ``warmup`` times, then ``iters`` rounds of all cases in turn.

    Interleaving spreads any background load over all cases alike.  Returns seconds per call.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in tqdm(range(iters), desc=desc, leave=False):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class Row:
    """One line of a throughput table: seconds per image and MACs per image."""

    name: str
    seconds: float
    macs: int

    @property
    def gmacs_per_s(self) -> float:
        return self.macs / self.seconds / 1e9 if self.seconds > 0 else float("nan")


def format_table(rows: Sequence[Row], baseline: str, title: str = "") -> str:
    """Latency, GMAC, GMAC/s and the GMAC/s ratio of each row to the row named ``baseline``."""
    base = next((r for r in rows if r.name == baseline), None)
    if base is None:
        raise ValueError(f"baseline row {baseline!r} not in {[r.name for r in rows]}")
    width = max(len(r.name) for r in rows)
    header = f"{'part':<{width}}  {'ms/image':>9}  {'GMAC/image':>10}  {'GMAC/s':>7}  {'ratio':>6}"
    lines = [title, header, "-" * len(header)] if title else [header, "-" * len(header)]
    for r in rows:
        ratio = r.gmacs_per_s / base.gmacs_per_s if r.macs else float("nan")
        ratio_text = f"{ratio:6.2f}" if r.macs else f"{'-':>6}"
        rate = f"{r.gmacs_per_s:7.1f}" if r.macs else f"{'-':>7}"
        lines.append(
            f"{r.name:<{width}}  {r.seconds * 1e3:9.1f}  {r.macs / 1e9:10.2f}  {rate}  {ratio_text}"
        )
    return "\n".join(lines)
