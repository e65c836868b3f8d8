"""Benchmark: one whole-volume attack step against one whole-volume forward pass, measured in one run.

A 3D MONAI ``UNet`` on a 96³ volume through :class:`common.sliding_window.SlidingWindowForward`
(roi 64³, overlap 0.5). Reports the median of ``repeats`` timings of

- ``forward_s``: the clean sliding-window forward pass under ``torch.no_grad()`` (the physical floor);
- ``step_exact_s``: one FGSM step with ``aggregation="exact"`` (forward with graph + input backward);
- ``step_window_mean_s``: one FGSM step with ``aggregation="window_mean"``;

and the ratios step / forward. Then the cost of the default worst-case ensemble
(:data:`common.attacks.DEFAULT_ENSEMBLE`, :func:`common.attacks.worst_case_attack`) per case as a
multiple of one clean forward pass of that case (``worst_case``):

- 2D: a MONAI ``UNet`` (16, 32, 64, 128) trained for ``epochs`` on 48 chest phantoms (64², lungs vs
  rest, Adam 1e-3), attacked at ε = 8/255 on ``cases`` test phantoms one case at a time, with the early
  stop at Dice 0 (the default) and without it (every member runs its full budget: the upper bound);
- 3D: the untrained 3D ``UNet`` above through ``SlidingWindowForward`` (exact aggregation) on a
  ``wc_size``³ volume with ``wc_roi``³ windows, without the early stop (an untrained network's Dice
  says nothing about when a real case would stop).

The last line of output is one JSON object.

    python -m scripts.bench_attack --size 96 --roi 64 --repeats 3
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import fire
import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from common.attacks import DEFAULT_ENSEMBLE, FGSM, worst_case_attack
from common.data.synthetic import chest_xray_phantom
from common.sliding_window import SlidingWindowForward


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _phantoms(seeds, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(chest_xray_phantom((size, size), seed=s) for s in seeds))
    x = torch.from_numpy(np.stack(images))
    y = torch.from_numpy(np.isin(np.stack(labels), (1, 2)).astype(np.int64))[:, None]  # lungs vs rest
    return x, y


def worst_case_cost_2d(cases: int = 4, epochs: int = 30, seed: int = 0) -> dict:
    """Worst-case cost per case / one forward pass on a trained 2D phantom UNet (see the module docstring)."""
    torch.manual_seed(seed)
    x, y = _phantoms(range(48))
    network = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    opt = torch.optim.Adam(network.parameters(), 1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(48).split(8):
            opt.zero_grad()
            F.cross_entropy(network(x[idx]), y[idx, 0]).backward()
            opt.step()
    network.eval()
    xt, yt = _phantoms(range(1000, 1000 + cases))
    eps = 8 / 255
    forward, full, stop = [], [], []
    for i in range(cases):
        xi, yi = xt[i : i + 1], yt[i : i + 1]

        def clean():
            with torch.no_grad():
                network(xi)

        forward.append(_median_time(clean, 5))
        for out, kwargs in ((stop, {}), (full, {"stop_dice": None})):
            start = time.perf_counter()
            worst_case_attack(network, xi, yi, eps=eps, clip=(0, 1), **kwargs)
            out.append(time.perf_counter() - start)
    f = statistics.median(forward)
    return {
        "network": "monai UNet 2D channels=(16,32,64,128) strides=(2,2,2) num_res_units=2, trained on chest phantoms",
        "image": [64, 64], "cases": cases, "eps": eps, "forward_s": round(f, 5),
        "worst_case_s": round(statistics.mean(stop), 3), "worst_case_no_stop_s": round(statistics.mean(full), 3),
        "forwards_per_case": round(statistics.mean(stop) / f, 1),
        "forwards_per_case_no_stop": round(statistics.mean(full) / f, 1),
    }


def worst_case_cost_3d(network, size: int, roi: int, overlap: float, sw_batch_size: int) -> dict:
    """Worst-case cost (no early stop) / one sliding-window forward pass on a 3D volume."""
    x = torch.rand(1, 1, size, size, size)
    y = (torch.rand(1, 1, size, size, size) > 0.9).long()
    forward = SlidingWindowForward(network, roi, overlap, sw_batch_size, aggregation="exact")

    def clean():
        with torch.no_grad():
            forward(x)

    f = _median_time(clean, 3)
    start = time.perf_counter()
    worst_case_attack(forward, x, y, eps=8 / 255, clip=(0, 1), stop_dice=None)
    w = time.perf_counter() - start
    return {
        "volume": [size] * 3, "roi": [roi] * 3, "overlap": overlap, "aggregation": "exact",
        "forward_s": round(f, 4), "worst_case_no_stop_s": round(w, 2), "forwards_per_case_no_stop": round(w / f, 1),
    }


def main(size: int = 96, roi: int = 64, overlap: float = 0.5, sw_batch_size: int = 4, repeats: int = 3, seed: int = 0,
         cases: int = 4, epochs: int = 30, wc_size: int = 48, wc_roi: int = 32) -> dict:
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
        "worst_case": {
            "ensemble": [[name, kwargs] for name, kwargs in DEFAULT_ENSEMBLE],
            "gradient_evaluations_per_case_max": sum(kwargs["steps"] for _, kwargs in DEFAULT_ENSEMBLE),
            "2d": worst_case_cost_2d(cases, epochs, seed),
            "3d": worst_case_cost_3d(network, wc_size, wc_roi, overlap, sw_batch_size),
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from scripts.cli import run

    run(main, serialize=lambda _: None)
