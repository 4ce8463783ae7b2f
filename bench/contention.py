"""The fast attribution map when other processes load the same cores: alone, with one and with two
busy competitors, for several thread settings side by side.

Each setting runs in a fresh child process (the OpenMP wait policy is read when torch loads),
which explains ``--maps`` phantoms with the bundle's ``fast`` preset at the model's input size
and reports the median seconds per map.  A competitor is a process multiplying 600 x 600
matrices with numpy on one thread, forever.  Settings:

* ``default``: torch threads = cores, no wait policy set (the GNU OpenMP runtime spins a while,
  then sleeps): what the worker did before this benchmark;
* ``spin``: torch threads = cores, ``OMP_WAIT_POLICY=ACTIVE`` (waiting threads spin);
* ``passive``: torch threads = cores, ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep);
* ``one-thread``: one torch thread.

The reference is each setting alone; the figure is its time with competitors, and the ratio.
``coronet`` (the worker and ``coronet infer``) applies the setting this benchmark chose, see
``docs/benchmarks.md``.

    python -m bench.contention --maps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

SETTINGS = {
    "default": ({}, 0),
    "spin": ({"OMP_WAIT_POLICY": "ACTIVE"}, 0),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    "one-thread": ({}, 1),
}
COMPETITOR = (
    "import numpy as np\n"
    "a = np.random.default_rng(0).random((600, 600))\n"
    "while True:\n"
    "    a = a @ a\n"
    "    a /= np.abs(a).max()\n"
)
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def child(maps: int, threads: int) -> None:
    """Explain ``maps`` phantoms with the fast preset; print the seconds of each as JSON."""
    import torch

    from monai_bundle.scripts.attribution import Explainer, load_presets
    from monai_bundle.scripts.classes import CLASS_NAMES
    from monai_bundle.scripts.networks import CoroNet, load_coronet_weights
    from monai_bundle.scripts.pointing_game import model_phantom

    if threads:
        torch.set_num_threads(threads)
    network = CoroNet()
    load_coronet_weights(network, "monai_bundle/models/model.pt")
    explainer = Explainer(network.eval())
    fast = load_presets()["fast"]
    config = json.loads(Path("monai_bundle/configs/inference.json").read_text())
    size = int(config["image_size"])
    images = [
        torch.from_numpy(model_phantom(label, size, 500 + i).image)[None]
        for i, label in enumerate(["pneumonia", "COVID-19"] * (maps // 2 + 1))
    ][: maps + 1]
    explainer.explain(images[0], 1, fast)  # warm-up: oneDNN builds its kernels
    seconds = []
    for index, image in enumerate(images[1:], start=1):
        start = time.perf_counter()
        explainer.explain(image, CLASS_NAMES.index(["pneumonia", "COVID-19"][index % 2]), fast)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


@contextmanager
def competitors(count: int) -> Iterator[None]:
    env = {**os.environ, **SINGLE_THREAD}
    procs = [subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env) for _ in range(count)]
    try:
        time.sleep(1.0 if procs else 0.0)  # let them reach their loop
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def measure(setting: str, maps: int) -> tuple[float, int]:
    extra, threads = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(extra)
    argv = [sys.executable, "-m", "bench.contention", "--child", "--maps", str(maps)]
    result = subprocess.run(
        [*argv, "--threads", str(threads)], env=env, capture_output=True, text=True, check=True
    )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    seconds = sorted(data["seconds"])
    return seconds[len(seconds) // 2], int(data["threads"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=5, help="timed maps per measurement")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.maps, args.threads)
        return 0
    chosen = args.settings.split(",")
    results: dict[str, dict[int, float]] = {name: {} for name in chosen}
    threads: dict[str, int] = {}
    for count in (0, 1, 2):
        with competitors(count):
            for name in chosen:
                results[name][count], threads[name] = measure(name, args.maps)
                print(f"{name} with {count} competitor(s): {results[name][count]:.2f} s/map",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"fast map, median of {args.maps}, on {os.cpu_count()} cores; busy competitors are "
          "single-thread numpy loops")  # fmt: skip
    header = f"{'setting':12} {'threads':>7} {'alone s':>8} {'+1 busy s':>10} {'ratio':>6} " + (
        f"{'+2 busy s':>10} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for name in chosen:
        alone, one, two = (results[name][c] for c in (0, 1, 2))
        print(f"{name:12} {threads[name]:7d} {alone:8.2f} {one:10.2f} {one / alone:6.2f} "
              f"{two:10.2f} {two / alone:6.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
