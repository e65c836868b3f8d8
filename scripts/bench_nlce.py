"""Benchmark NLCE (fused attention, matrix-product context encoding) against a materialising reference.

The reference evaluates the same module's weights the textbook way: the non-local block builds the
N x N attention matrix softmax(theta^T phi) (Eq. 1-2) and the context encoder builds all residuals
z_i - d_k, a (B, N, K, C'') tensor (Eq. 3). Each variant and size runs forward + backward in a fresh
subprocess, so the two never share allocator state.

Peak memory is the process's peak resident set size during one forward + backward, minus the
resident size just before it: the peak is reset with ``/proc/self/clear_refs`` (Linux) after a
warm-up at 8 x 8 and read back from ``VmHWM`` in ``/proc/self/status``. It counts every page the
CPU allocator (and oneDNN) actually touched. Time is the median of ``repeats`` further runs.

Usage::

    python scripts/bench_nlce.py                       # 64x64 and 128x128, C = 64, batch 2
    python scripts/bench_nlce.py --sizes "[32,64]" --out bench_nlce.json

The last line printed is one JSON object; ``memory_ratio_128`` = NLCE peak / reference peak at
128 x 128 (target <= 0.25).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time

import fire
import torch
import torch.nn.functional as F

from common.io import atomic_write_json
from common.networks.nlce import NLCE

MEMORY_METHOD = (
    "peak RSS (VmHWM after a /proc/self/clear_refs reset) minus RSS at the reset, one fresh subprocess per "
    "variant and size, forward + backward after a warm-up at 8x8"
)


def build_module(channels: int, num_codes: int, seed: int) -> NLCE:
    """An NLCE with its W_z batch-norm scale set to 1, so the non-local branch is not zero."""
    torch.manual_seed(seed)
    module = NLCE(2, channels, num_codes=num_codes)
    torch.nn.init.ones_(module.nl.w_z[1].weight)
    return module


def reference_forward(module: NLCE, x: torch.Tensor) -> torch.Tensor:
    """NLCE evaluated with a materialised (B, N, N) attention and (B, N, K, C'') residuals."""
    nl, ce = module.nl, module.ce
    b, c, h, w = x.shape
    theta, phi, g = (f(x).flatten(2) for f in (nl.theta, nl.phi, nl.g))  # (B, C', N)
    attn = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # (B, N, N)
    y = torch.bmm(g, attn.transpose(1, 2)).reshape(b, -1, h, w)  # y_i = sum_j attn_ij g_j
    fz = nl.w_z(y) + x
    z = ce.proj(fz).flatten(2).transpose(1, 2)  # (B, N, C'')
    residuals = z.unsqueeze(2) - ce.codewords  # (B, N, K, C'')
    assign = torch.softmax(-ce.smoothing * residuals.pow(2).sum(-1), dim=-1)  # (B, N, K)
    e_k = (assign.unsqueeze(-1) * residuals).sum(1)  # (B, K, C'')
    e = F.relu(ce.norm(e_k)).sum(1)
    gamma = torch.sigmoid(module.gate(e))
    return fz * gamma[..., None, None]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.M).group(1))


def measure(variant: str, size: int, channels: int, batch: int, num_codes: int, repeats: int, threads: int,
            seed: int = 0) -> dict:
    """Peak memory (MiB) and median time (s) of one forward + backward; run in a fresh process."""
    torch.set_num_threads(threads)
    module = build_module(channels, num_codes, seed)
    forward = module if variant == "nlce" else (lambda x: reference_forward(module, x))

    def step(side: int) -> None:
        x = torch.randn(batch, channels, side, side, requires_grad=True)
        forward(x).square().mean().backward()
        module.zero_grad(set_to_none=True)

    step(8)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    rss_before = _status_kib("VmRSS")
    step(size)
    peak_mib = (_status_kib("VmHWM") - rss_before) / 1024.0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(size)
        times.append(time.perf_counter() - start)
    return {"peak_mib": round(peak_mib, 1), "time_s": round(statistics.median(times), 4)}


def _measure_in_subprocess(**kwargs) -> dict:
    code = f"import json; from scripts.bench_nlce import measure; print(json.dumps(measure(**{kwargs!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {kwargs} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_abs_difference(channels: int = 64, num_codes: int = 32, size: int = 16, seed: int = 0) -> float:
    """Largest |NLCE - reference| on one random (2, C, size, size) input, in eval mode, float64."""
    module = build_module(channels, num_codes, seed).double().eval()
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    with torch.no_grad():
        return float((module(x) - reference_forward(module, x)).abs().max())


def main(sizes=(64, 128), channels: int = 64, batch: int = 2, num_codes: int = 32, repeats: int = 3,
         threads: int = 1, out: str | None = None) -> None:
    """Run both variants at every size and print (and optionally write) one JSON summary."""
    sizes = [int(s) for s in (sizes if isinstance(sizes, (list, tuple)) else [sizes])]
    if not sizes or any(s < 8 for s in sizes):
        raise ValueError(f"sizes: expected side lengths >= 8, got {sizes!r}")
    for name, value in (("channels", channels), ("batch", batch), ("num_codes", num_codes),
                        ("repeats", repeats), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    common = dict(channels=channels, batch=batch, num_codes=num_codes, repeats=repeats, threads=threads)
    results = {}
    for size in sizes:
        row = {v: _measure_in_subprocess(variant=v, size=size, **common) for v in ("nlce", "reference")}
        row["memory_ratio"] = round(row["nlce"]["peak_mib"] / row["reference"]["peak_mib"], 4)
        row["time_ratio"] = round(row["nlce"]["time_s"] / row["reference"]["time_s"], 4)
        results[f"{size}x{size}"] = row
    summary = {
        "benchmark": "NLCE forward+backward vs materialised N x N attention and O(N K C) context encoding",
        "device": "cpu",
        "torch": torch.__version__,
        **common,
        "inter_channels": channels // 2,
        "memory_method": MEMORY_METHOD,
        "max_abs_diff_vs_reference_16x16_float64": max_abs_difference(channels, num_codes),
        "results": results,
        "memory_ratio_128": results.get("128x128", {}).get("memory_ratio"),
        "time_ratio_128": results.get("128x128", {}).get("time_ratio"),
    }
    if out is not None:
        atomic_write_json(out, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    from scripts.cli import run

    run(main)
