"""Benchmark of the ResDSN coarse-to-fine pipeline (Li et al. 2019, ResDSN C2F, Table 6) and of one whole-volume attack
step's memory. The last line of output is one JSON object.

On one abdomen phantom (default 160×160×96 voxels) with two ResDSN of the given widths (default the
paper's (32, 64, 128, 256)) and 64³ windows, the three pipelines are built exactly as the bundle's
``configs/inference.json`` builds them and timed by the bundle's own Table 6 code,
:func:`common.c2f_eval.timed_evaluation` (``evaluate.json``), with the same post-processing (removal of
components < 0.2 of the prediction) inside the timed region:

- ``coarse_s``: ``PerCaseZNorm(SlidingWindowN(coarse, n_coarse))`` over the whole volume ("ResDSN Coarse");
- ``fine_s``: ``PerCaseZNorm(SlidingWindowN(fine, n_fine))`` over the whole volume ("ResDSN Fine");
- ``c2f_s``: ``PerCaseZNorm(CoarseToFine(...))``: the coarse sliding window on the whole volume, removal of
  small coarse components, the crop (Eq. 4, margin m), the fine sliding window with ``n_fine`` on the crop,
  the de-crop (Eq. 5) and the final component removal; ``ratio_c2f_fine`` = c2f_s / fine_s (the paper:
  245 s / 382 s = 0.64 on 512×512×D NIH volumes).

``timed_evaluation`` runs, for every repeat, coarse → fine → C2F back to back in one process (repeats are
interleaved); the seconds are the means over ``repeats`` and every repeat's wall-clock seconds are reported
too. Besides the wall clock (``*_s``, ``ratio_c2f_fine``) the CPU time of the process over its threads is
reported (``*_cpu_s``, ``ratio_c2f_fine_cpu``): on a shared machine the load of other processes changes
from minute to minute and moves the wall-clock ratio, much less the CPU-time ratio.

The weights are untrained (the time does not depend on them), so the coarse stage of C2F runs the real
coarse sliding window but hands C2F the phantom's ground-truth mask as its prediction
(:class:`GroundTruthCoarse`): an untrained network's mask would be empty or the whole volume, and the
fine stage would then be skipped or cover everything. The crop box is therefore the pancreas box plus
``margin``, as for a good coarse model.

``attack_step_peak_rss_mb``: peak resident memory (``ru_maxrss``) of a fresh subprocess that builds the
network, a 256×256×128 phantom, and runs one FGSM step with the paper's window-mean gradient
(``SlidingWindowForward(aggregation="window_mean", skip_background=True)`` with the overlap of
``attack_n``, default ``n_coarse``).

The paper's n (6 coarse, 12 fine) are the defaults. On a 2-core CPU the fine-only pass alone at n = 12 is
3825 windows of 64³ on 160×160×96 (15 × 15 × 17: the paper's 14 × 14 × 13 is not reachable with integer
scan intervals, see ``common.c2f.overlap_for_n``) with the paper-size ResDSN, measured at ≈ 2.6 s per
window here (batch of 4 windows in 10.3 s, 2 threads) — close to three hours — so the measured
configuration in ``docs/README.md`` uses n = 1 / 2 (the paper's 1 : 2 ratio)::

    python -m scripts.bench_c2f                                   # the paper's n = 6 / 12
    python -m scripts.bench_c2f --n_coarse 1 --n_fine 2 --repeats 2   # the measured configuration
"""

from __future__ import annotations

import csv
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import fire
import numpy as np
import torch

from common.attacks import FGSM
from common.c2f import CoarseToFine, SlidingWindowN, bounding_box, overlap_for_n, remove_small_components
from common.c2f_eval import timed_evaluation
from common.data.synthetic import abdomen_ct_phantom
from common.networks.normalise import PerCaseZNorm, hu_to_window
from common.networks.resdsn import ResDSN
from common.sliding_window import SlidingWindowForward
from common.validation import check_nonnegative, check_positive_int

MIN_VOLUME = (160, 160, 96)


def phantom(size: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, *size) window-scaled CT in [0, 1] and (1, 1, *size) int64 pancreas labels."""
    hu, label = abdomen_ct_phantom(tuple(size), seed)
    x = hu_to_window(torch.from_numpy(hu).clamp(-100.0, 240.0))[None].float()
    return x, torch.from_numpy(label)[None, None].long()


class GroundTruthCoarse:
    """Runs the real coarse sliding window (so its cost is measured) and returns the one-hot logits of
    the ground-truth mask as the coarse prediction (untrained weights give no usable mask)."""

    def __init__(self, window: SlidingWindowN, label: torch.Tensor) -> None:
        self.window, self.label = window, label

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.window(z)
        return torch.cat([(self.label == 0).float(), (self.label == 1).float()], dim=1)


def windows(size: Sequence[int], roi: int, n: int) -> int:
    """Number of windows MONAI's sliding window scans on ``size`` with the overlap of the paper's n
    (the count of ``monai.inferers.utils.dense_patch_slices``; an axis ≤ roi holds one window)."""
    overlap = overlap_for_n(tuple(size), (roi,) * len(size), n)
    counts = []
    for w, o in zip(size, overlap):
        step = max(1, int(roi * (1 - o)))
        counts.append(1 if w <= roi else -(-(w - roi) // step) + 1)
    return int(np.prod(counts))


def attack_step(size: Sequence[int], channels: Sequence[int], roi: int, n: int, sw_batch_size: int, seed: int) -> dict:
    """One window-mean FGSM step on a whole phantom volume; run in a fresh process by :func:`main`."""
    torch.manual_seed(seed)
    x, y = phantom(size, seed)
    net = ResDSN(channels=tuple(channels)).eval()
    overlap = overlap_for_n(tuple(size), (roi,) * 3, n)
    forward = PerCaseZNorm(SlidingWindowForward(net, roi, overlap, sw_batch_size, aggregation="window_mean", skip_background=True))
    start = time.perf_counter()
    x_adv = FGSM(forward, eps=0.03, clip=(0.0, 1.0))(x, y)
    seconds = time.perf_counter() - start
    if float((x_adv - x).abs().max()) > 0.03 + 1e-6:
        raise RuntimeError("attack step left the eps-ball")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"attack_step_s": seconds, "attack_step_peak_rss_mb": peak_kb / 1024.0}


def _attack_subprocess(size, channels, roi, n, sw_batch_size, seed) -> dict:
    code = (
        "import json; from scripts.bench_c2f import attack_step; "
        f"print(json.dumps(attack_step({list(size)}, {list(channels)}, {roi}, {n}, {sw_batch_size}, {seed})))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"attack step subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(
    size: Sequence[int] = MIN_VOLUME,
    channels: Sequence[int] = (32, 64, 128, 256),
    attack_size: Sequence[int] = (256, 256, 128),
    attack_channels: Sequence[int] | None = None,
    roi: int = 64,
    n_coarse: int = 6,
    n_fine: int = 12,
    attack_n: int | None = None,
    margin: int = 20,
    sw_batch_size: int = 4,
    repeats: int = 1,
    threads: int | None = None,
    seed: int = 0,
    out_dir: str | None = None,
    skip_attack: bool = False,
) -> dict:
    """Measure and print the JSON (see the module docstring). ``out_dir`` keeps ``timed_evaluation``'s
    per-run CSV / JSON / Markdown (default: a temporary directory, removed)."""
    if threads:
        torch.set_num_threads(check_positive_int(threads, "threads"))
    size, channels = tuple(int(s) for s in size), tuple(int(c) for c in channels)
    if len(size) != 3 or any(s < m for s, m in zip(size, MIN_VOLUME)):
        raise ValueError(f"size: expected a volume of at least {MIN_VOLUME}, got {size}")
    attack_channels = tuple(int(c) for c in (attack_channels or channels))
    n_coarse, n_fine = int(check_nonnegative(n_coarse, "n_coarse")), int(check_nonnegative(n_fine, "n_fine"))
    attack_n = n_coarse if attack_n is None else int(check_nonnegative(attack_n, "attack_n"))
    repeats = check_positive_int(repeats, "repeats")
    torch.manual_seed(seed)
    x, y = phantom(size, seed)
    coarse_net, fine_net = ResDSN(channels=channels).eval(), ResDSN(channels=channels).eval()
    roi3 = (roi,) * 3
    coarse_window = SlidingWindowN(coarse_net, roi3, n_coarse, sw_batch_size)
    fine_window = SlidingWindowN(fine_net, roi3, n_fine, sw_batch_size)
    c2f = CoarseToFine(GroundTruthCoarse(coarse_window, y), fine_window, margin, 0.2, mask_input=False)
    forwards = {  # as configs/inference.json: coarse_forward, fine_forward, c2f_forward
        "ResDSN Coarse": PerCaseZNorm(coarse_window),
        "ResDSN Fine": PerCaseZNorm(fine_window),
        "ResDSN C2F": PerCaseZNorm(c2f),
    }
    postprocess = functools.partial(remove_small_components, min_fraction=0.2)  # as evaluate.json
    box = bounding_box(y[0, 0], margin)
    box_size = [s.stop - s.start for s in box]
    data = [{"image": x, "label": y}] * repeats
    with tempfile.TemporaryDirectory() as tmp:
        summary = timed_evaluation(forwards, data, 2, out_dir or tmp, postprocess, title="bench_c2f")
        with open(os.path.join(out_dir or tmp, "per_case.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    per_run = {name: [float(r["seconds"]) for r in rows if r["pipeline"] == name] for name in forwards}
    secs = {e["pipeline"]: e["seconds_mean"] for e in summary["entries"]}
    cpu = {e["pipeline"]: e["cpu_seconds_mean"] for e in summary["entries"]}
    result = {
        "benchmark": "resdsn_c2f",
        "volume": list(size),
        "channels": list(channels),
        "roi": roi,
        "n_coarse": n_coarse,
        "n_fine": n_fine,
        "margin": margin,
        "sw_batch_size": sw_batch_size,
        "repeats": repeats,
        "coarse_windows": windows(size, roi, n_coarse),
        "fine_windows_whole_volume": windows(size, roi, n_fine),
        "fine_box": box_size,
        "fine_windows_in_box": windows(box_size, roi, n_fine),
        "coarse_s": secs["ResDSN Coarse"],
        "fine_s": secs["ResDSN Fine"],
        "c2f_s": secs["ResDSN C2F"],
        "ratio_c2f_fine": secs["ResDSN C2F"] / secs["ResDSN Fine"],
        "coarse_cpu_s": cpu["ResDSN Coarse"],
        "fine_cpu_s": cpu["ResDSN Fine"],
        "c2f_cpu_s": cpu["ResDSN C2F"],
        "ratio_c2f_fine_cpu": cpu["ResDSN C2F"] / cpu["ResDSN Fine"],
        "seconds_per_repeat": {k: v for k, v in zip(("coarse", "fine", "c2f"), per_run.values())},
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "cpu": platform.processor() or platform.machine(),
        "coarse_mask": "ground truth of the phantom (untrained weights); the coarse network still runs",
    }
    if not skip_attack:
        result.update(_attack_subprocess(attack_size, attack_channels, roi, attack_n, sw_batch_size, seed))
        result.update(attack_volume=list(attack_size), attack_channels=list(attack_channels), attack_n=attack_n,
                      attack_windows=windows(attack_size, roi, attack_n))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from scripts.cli import run

    run(main, serialize=lambda _: None)
