"""Benchmark randomized-smoothing certification against its physical floor, the n0 + n forward passes.

Measured in one run (times in seconds, best of ``repeats`` for each figure):

- ``certify_s``: :func:`common.certify.certify` of one 1×1×size×size image with a MONAI 2D UNet
  (channels (16, 32, 64, 128), strides (2, 2, 2), 3 classes), n0 = 10, n = 100.
- ``forwards_s``: the same n0 + n forward passes alone, in the same batches (pre-drawn inputs).
- ``ratio`` = certify_s / forwards_s (target ≤ 1.15).
- ``stats_2d_s`` / ``stats_3d_s``: the statistics alone (p-values, Holm, abstain) of
  :func:`common.certify.certify_counts` for a size² and a size_3d³ map from given counts
  (targets ≤ 0.05 s and ≤ 2 s).

Usage: ``python scripts/bench_certify.py [--size 256] [--size_3d 128] [--repeats 3] [--threads N]``.
The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import time

import fire
import torch
from monai.networks.nets import UNet

from common.certify import certify, certify_counts
from common.validation import check_positive_int

TARGETS = {"ratio": 1.15, "stats_2d_s": 0.05, "stats_3d_s": 2.0}


def _best_of(repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(
    size: int = 256,
    size_3d: int = 128,
    n0: int = 10,
    n: int = 100,
    batch_size: int = 16,
    num_classes: int = 3,
    sigma: float = 0.25,
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Run the benchmark, print a few human-readable lines, then the JSON summary as the last line.

    ``threads`` None keeps torch's default intra-op thread count; an integer pins it (on a shared,
    loaded machine one thread avoids thread-pool stalls that inflate the many small certify ops).
    """
    if threads is not None:
        torch.set_num_threads(check_positive_int(threads, "threads"))
    size, size_3d, repeats = (check_positive_int(v, k) for k, v in
                              (("size", size), ("size_3d", size_3d), ("repeats", repeats)))
    torch.manual_seed(seed)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=num_classes, channels=(16, 32, 64, 128),
               strides=(2, 2, 2), num_res_units=2).eval()
    x = torch.rand(1, 1, size, size)
    batches = [min(batch_size, draws - start) for draws in (n0, n) for start in range(0, draws, batch_size)]
    inputs = [torch.rand(b, 1, size, size) for b in batches]

    def forwards() -> None:
        with torch.no_grad():
            for batch in inputs:
                net(batch)

    def run_certify() -> None:
        generator = torch.Generator().manual_seed(seed)
        certify(net, x, sigma, n0=n0, n=n, batch_size=batch_size, generator=generator)

    forwards()  # warm-up (allocator, kernels)
    forwards_s = certify_s = float("inf")
    for _ in range(repeats):  # interleaved, so both see the same machine load
        forwards_s = min(forwards_s, _best_of(1, forwards))
        certify_s = min(certify_s, _best_of(1, run_certify))

    g = torch.Generator().manual_seed(seed)
    stats = {}
    for name, shape in (("stats_2d_s", (1, size, size)), ("stats_3d_s", (1, size_3d, size_3d, size_3d))):
        counts = torch.randint(60, n + 1, shape, generator=g)
        selected = torch.randint(0, num_classes, shape, generator=g)
        stats[name] = _best_of(repeats, lambda: certify_counts(selected, counts, n, alpha=0.001, tau=0.75))

    result = {
        "certify_s": round(certify_s, 4),
        "forwards_s": round(forwards_s, 4),
        "ratio": round(certify_s / forwards_s, 4),
        "stats_2d_s": round(stats["stats_2d_s"], 4),
        "stats_3d_s": round(stats["stats_3d_s"], 4),
        "forward_calls": len(batches),
        "batches": batches,
        "image": [1, 1, size, size],
        "volume_3d": [1, size_3d, size_3d, size_3d],
        "n0": n0,
        "n": n,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }
    result["meets_targets"] = {k: result[k] <= v for k, v in TARGETS.items()}
    print(f"certify {certify_s:.3f} s vs {len(batches)} forward calls {forwards_s:.3f} s "
          f"(ratio {result['ratio']:.3f}); stats 2D {stats['stats_2d_s']:.4f} s, "
          f"3D {stats['stats_3d_s']:.3f} s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from scripts.cli import run

    run(main, serialize=lambda _: None)  # the JSON line printed by main stays the last line
