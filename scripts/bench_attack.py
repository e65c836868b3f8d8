"""Benchmark: one whole-volume attack step against one whole-volume forward pass, measured in one run.

A 3D MONAI ``UNet`` on a 96³ volume through :class:`common.sliding_window.SlidingWindowForward`
(roi 64³, overlap 0.5). Reports the median of ``repeats`` timings of

- ``forward_s``: the clean sliding-window forward pass under ``torch.no_grad()`` (the physical floor);
- ``step_exact_s``: one FGSM step with ``aggregation="exact"`` (forward with graph + input backward);
- ``step_window_mean_s``: one FGSM step with ``aggregation="window_mean"``;

and the ratios step / forward. The last line of output is one JSON object.

    python -m scripts.bench_attack --size 96 --roi 64 --repeats 3
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import fire
import torch
from monai.networks.nets import UNet

from common.attacks import FGSM
from common.sliding_window import SlidingWindowForward


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(size: int = 96, roi: int = 64, overlap: float = 0.5, sw_batch_size: int = 4, repeats: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    network = UNet(
        spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2
    ).eval()
    x = torch.randn(1, 1, size, size, size)
    y = (torch.rand(1, 1, size, size, size) > 0.9).long()
    exact = SlidingWindowForward(network, roi, overlap, sw_batch_size, aggregation="exact")
    window_mean = SlidingWindowForward(network, roi, overlap, sw_batch_size, aggregation="window_mean")

    def forward():
        with torch.no_grad():
            exact(x)

    forward_s = _median_time(forward, repeats)
    step_exact_s = _median_time(lambda: FGSM(exact, 0.01)(x, y), repeats)
    step_window_mean_s = _median_time(lambda: FGSM(window_mean, 0.01)(x, y), repeats)
    result = {
        "benchmark": "attack_step_vs_forward",
        "volume": [size] * 3,
        "roi": [roi] * 3,
        "overlap": overlap,
        "sw_batch_size": sw_batch_size,
        "network": "monai UNet channels=(16,32,64,128) strides=(2,2,2) num_res_units=2",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "repeats": repeats,
        "forward_s": round(forward_s, 4),
        "step_exact_s": round(step_exact_s, 4),
        "step_window_mean_s": round(step_window_mean_s, 4),
        "ratio_exact": round(step_exact_s / forward_s, 3),
        "ratio_window_mean": round(step_window_mean_s / forward_s, 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from scripts.cli import run

    run(main, serialize=lambda _: None)
