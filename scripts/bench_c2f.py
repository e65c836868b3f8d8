"""Benchmark of the ResDSN coarse-to-fine pipeline (seed ``002``, Table 6) and of one whole-volume attack
step's memory, measured in one run. The last line of output is one JSON object.

On one abdomen phantom (default 160×160×96 voxels, window-scaled to [0, 1], per-case z-normalised by
:class:`common.networks.normalise.PerCaseZNorm`) with two ResDSN of the given widths (default the
paper's (32, 64, 128, 256)), 64³ windows:

- ``coarse_s``: coarse model, sliding window with n = 6 over the whole volume;
- ``fine_s``: fine model over the whole volume with the fine n = 12 ("ResDSN Fine" of Table 6);
- ``c2f_s``: the full C2F pipeline (coarse n = 6, crop, fine n = 12 in the box, de-crop, removal of
  components < 0.2); ``ratio_c2f_fine`` = c2f_s / fine_s (the paper: 245 / 382 = 0.64).

The weights are untrained (timing does not depend on them), so the coarse stage runs the real coarse
network but hands C2F the phantom's ground-truth mask as its prediction (``GroundTruthCoarse``): an
untrained network's mask would be empty or the whole volume, and the fine stage would then be skipped or
cover everything. The crop box is therefore the pancreas box plus ``margin``, as for a good coarse model.

``attack_step_peak_rss_mb``: peak resident memory (``ru_maxrss``) of a fresh subprocess that builds the
networks, a 256×256×128 phantom, and runs one FGSM step with the paper's window-mean gradient
(``SlidingWindowForward(aggregation="window_mean", skip_background=True)``, the coarse n = 6 overlap).

    python -m scripts.bench_c2f                       # the specified sizes
    python -m scripts.bench_c2f --channels "[8,16,32,64]" --attack_channels "[32,64,128,256]"
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

import fire
import numpy as np
import torch

from common.attacks import FGSM
from common.c2f import CoarseToFine, SlidingWindowN, overlap_for_n, remove_small_components, windows_per_axis
from common.data.synthetic import abdomen_ct_phantom
from common.networks.normalise import PerCaseZNorm, hu_to_window
from common.networks.resdsn import ResDSN
from common.sliding_window import SlidingWindowForward


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


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return time.perf_counter() - start, out


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
    assert float((x_adv - x).abs().max()) <= 0.03 + 1e-6
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"attack_step_s": seconds, "attack_step_peak_rss_mb": peak_kb / 1024.0}


def main(
    size: Sequence[int] = (160, 160, 96),
    channels: Sequence[int] = (32, 64, 128, 256),
    attack_size: Sequence[int] = (256, 256, 128),
    attack_channels: Sequence[int] | None = None,
    roi: int = 64,
    n_coarse: int = 6,
    n_fine: int = 12,
    margin: int = 20,
    sw_batch_size: int = 4,
    threads: int | None = None,
    seed: int = 0,
    skip_attack: bool = False,
) -> dict:
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    size, channels = tuple(int(s) for s in size), tuple(int(c) for c in channels)
    attack_channels = tuple(int(c) for c in (attack_channels or channels))
    x, y = phantom(size, seed)
    coarse_net, fine_net = ResDSN(channels=channels).eval(), ResDSN(channels=channels).eval()
    roi3 = (roi,) * 3
    coarse = SlidingWindowN(coarse_net, roi3, n_coarse, sw_batch_size)
    fine = SlidingWindowN(fine_net, roi3, n_fine, sw_batch_size)
    z = PerCaseZNorm(lambda t: t)(x)  # the normalised volume every stage sees

    coarse_s, _ = _timed(lambda: remove_small_components(coarse(z).argmax(1, keepdim=True), 0.2))
    fine_s, _ = _timed(lambda: remove_small_components(fine(z).argmax(1, keepdim=True), 0.2))
    c2f = PerCaseZNorm(CoarseToFine(GroundTruthCoarse(coarse, y), fine, margin, 0.2, mask_input=False))
    c2f_s, pred = _timed(lambda: c2f(x))
    box = [(int(a.min()), int(a.max()) + 1) for a in np.nonzero(y[0, 0].numpy())]
    box_size = [min(s, hi + margin) - max(0, lo - margin) for (lo, hi), s in zip(box, size)]
    result = {
        "benchmark": "resdsn_c2f",
        "volume": list(size),
        "channels": list(channels),
        "roi": roi,
        "n_coarse": n_coarse,
        "n_fine": n_fine,
        "coarse_windows": int(np.prod([windows_per_axis(s, roi, n_coarse) for s in size])),
        "fine_box": box_size,
        "coarse_s": coarse_s,
        "fine_s": fine_s,
        "c2f_s": c2f_s,
        "ratio_c2f_fine": c2f_s / fine_s,
        "c2f_foreground_voxels": int(pred.sum()),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "coarse_mask": "ground truth of the phantom (untrained weights); the coarse network still runs",
    }
    if not skip_attack:
        code = (
            "import json, sys; from scripts.bench_c2f import attack_step; "
            f"print(json.dumps(attack_step({list(attack_size)}, {list(attack_channels)}, {roi}, {n_coarse}, "
            f"{sw_batch_size}, {seed})))"
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode != 0:
            raise RuntimeError(f"attack step subprocess failed:\n{proc.stderr[-4000:]}")
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        result.update(attack_volume=list(attack_size), attack_channels=list(attack_channels))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
