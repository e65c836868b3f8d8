"""Shared pieces of the reproduction studies: seeding, in-memory training, per-case Dice, attacks run
in batches, the worst-case attack, paired Wilcoxon tests and findings.

Every study trains small networks on phantoms held in memory as tensors — images ``x`` (N, C, *spatial)
float, labels ``y`` (N, 1, *spatial) int64 — so that one command trains and attacks every model of a
paper's experiments in minutes on a CPU. Determinism: :func:`seed_everything` (MONAI
``set_determinism``) before every model, and an explicit ``torch.Generator`` for batch order and noise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from scipy import stats as sps

import common.attacks as attacks
from common.metrics import segmentation_scores
from common.validation import main_output

__all__ = [
    "seed_everything",
    "dicece_objective",
    "train",
    "predict",
    "case_scores",
    "run_attack",
    "worst_case",
    "worst_case_name",
    "paired_wilcoxon",
    "finding",
    "fmt_p",
]

_DICECE = DiceCELoss(to_onehot_y=True, softmax=True)


def seed_everything(seed: int) -> torch.Generator:
    """MONAI ``set_determinism`` (Python, NumPy, torch seeds; deterministic algorithms) and a fresh
    torch generator seeded with ``seed`` for batch order and noise draws."""
    set_determinism(seed=int(seed))
    torch.manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


def dicece_objective(net: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy (MONAI ``DiceCELoss``) of the main head; deep-supervision heads (a list in
    train mode) are averaged with the main head."""
    out = net(xb)
    if isinstance(out, (list, tuple)):
        return torch.stack([_DICECE(o, yb) for o in out]).mean()
    return _DICECE(out, yb)


def train(
    net: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    objective: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = dicece_objective,
    params: Sequence[torch.nn.Parameter] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> torch.nn.Module:
    """Adam for ``epochs`` passes over (x, y) in shuffled mini-batches (order from ``generator``);
    ``objective(net, xb, yb)`` returns the scalar loss; ``params`` restricts the optimised parameters
    (frozen fine-tuning); ``on_epoch(epoch)`` runs after each epoch (1-based). Leaves ``net`` in eval mode."""
    opt = torch.optim.Adam(list(params) if params is not None else net.parameters(), lr=lr)
    n = x.shape[0]
    start_time = time.time()
    for epoch in range(1, int(epochs) + 1):
        net.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2 and n >= 2:  # batch-norm needs two samples
                continue
            loss = objective(net, x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        if on_epoch is not None:
            on_epoch(epoch)
    net.eval()
    log(f"trained {type(net).__name__} on {n} cases x {int(epochs)} epochs in {time.time() - start_time:.0f} s")
    return net


def log(message: str) -> None:
    """A progress line on stderr (the results go to files)."""
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@torch.no_grad()
def predict(forward: Callable, x: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Argmax labels (N, 1, *spatial) of ``forward`` (logits, or a callable already returning labels
    with one channel of integers) in batches."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        o = main_output(forward(x[start : start + batch_size]))
        out.append(o.long() if o.shape[1] == 1 and not o.is_floating_point() else o.argmax(1, keepdim=True))
    return torch.cat(out)


def case_scores(
    forward: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    names: Sequence[str] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    metric: str = "dice",
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Per-case Dice (or IoU) per foreground class (``names``) or region, plus ``mean``:
    ``{name: (N,) float64}`` computed by :func:`common.metrics.segmentation_scores`."""
    pred = predict(forward, x, batch_size)
    kw = {"regions": regions} if regions is not None else {"class_names": names}
    scores = segmentation_scores(pred, y, num_classes, **kw)
    prefix = f"{metric}_"
    return {k[len(prefix):]: v.numpy() for k, v in scores.items() if k.startswith(prefix)}


def run_attack(attack: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``attack(x, y)`` in batches; returns x_adv (N, C, *spatial)."""
    return torch.cat([attack(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, x.shape[0], batch_size)])


def worst_case_name() -> str:
    """Name and members of the worst-case attack :func:`worst_case` runs (stated in every study's settings)."""
    members = ", ".join(f"{name} {kw['loss']} {kw['steps']} steps" for name, kw in attacks.DEFAULT_ENSEMBLE)
    return f"common.attacks.worst_case_attack (SEA-style per-case worst case over {members})"


def worst_case(
    forward: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    clip: Sequence[float] | None = (0.0, 1.0),
    batch_size: int = 8,
    seed: int = 0,
    classes: Sequence | None = None,
) -> torch.Tensor:
    """Per-case worst adversarial input at L∞ radius ``eps`` (N, C, *spatial):
    ``common.attacks.worst_case_attack`` (the default ensemble) in batches of ``batch_size``; each case keeps
    the member's input with the lowest Dice of ``classes`` (``common.attacks.case_dice``: ``None`` the mean
    foreground-class Dice; a list of label lists the mean region Dice — score what the study reports)."""
    if eps == 0:
        return x.clone()
    outs = [attacks.worst_case_attack(forward, x[s : s + batch_size], y[s : s + batch_size], eps=eps, clip=clip,
                                      seed=seed, classes=classes) for s in range(0, x.shape[0], batch_size)]
    return torch.cat(outs)


def paired_wilcoxon(a: Sequence[float], b: Sequence[float], alternative: str = "greater") -> float:
    """p-value of the Wilcoxon signed-rank test (Wilcoxon 1945; ``scipy.stats.wilcoxon``) of the paired
    per-case differences a − b against H1 ``alternative`` ("greater": a > b). 1.0 when every difference
    is zero (no evidence either way)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size == 0 or np.allclose(d, 0.0):
        return 1.0
    return float(sps.wilcoxon(d, alternative=alternative, zero_method="wilcox").pvalue)


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def finding(claim: str, holds: bool | None, evidence: str) -> dict[str, Any]:
    """One finding: the paper's claim (cited), whether it holds here (None: not testable), the evidence."""
    return {"claim": claim, "holds": None if holds is None else bool(holds), "evidence": evidence}


def compare(
    claim: str,
    better: np.ndarray,
    worse: np.ndarray,
    better_name: str,
    worse_name: str,
    what: str,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Finding "``better`` > ``worse``" tested by a one-sided paired Wilcoxon at level ``alpha``."""
    p = paired_wilcoxon(better, worse, "greater")
    holds = p < alpha
    ev = (f"{what}: {better_name} {np.mean(better):.3f} vs {worse_name} {np.mean(worse):.3f} "
          f"(mean difference {np.mean(np.asarray(better) - np.asarray(worse)):+.3f}); one-sided paired Wilcoxon "
          f"signed-rank p = {fmt_p(p)}, n = {len(better)} cases, α = {alpha}")
    return finding(claim, holds, ev)


def phantom_tensors(generator: Callable, n: int, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` phantoms ``generator(seed=seed + i, **kwargs)`` (a :mod:`common.data.synthetic` function) stacked:
    images (n, C, *spatial) float32 and labels (n, 1, *spatial) int64."""
    xs, ys = zip(*(generator(seed=seed + i, **kwargs) for i in range(n)))
    return torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys))[:, None].long()


def eps_label(eps: float, scale: float = 255.0) -> str:
    """ε as "k/255" (or the plain value when not a whole number of 1/scale)."""
    k = eps * scale
    return f"{k:g}/{scale:g}" if abs(k - round(k, 3)) < 1e-6 else f"{eps:g}"
