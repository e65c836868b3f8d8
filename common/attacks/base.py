"""The shared base of every attack: validation, loss, input gradient, projection onto the ε-ball and ``clip``.

Design (after torchattacks): one small class per attack on a shared :class:`Attack` base that validates
input, resolves the loss, computes input gradients without touching the model, projects and clips; an
attack's own code is only its update rule. An attack is built once and called per batch::

    attack = IFGSM(forward, eps=0.05, alpha=0.005, steps=10, loss="dice", clip=(0.0, 1.0))
    x_adv = attack(x, y)          # x (B, C, *spatial) float, y (B, 1, *spatial) integer labels

``forward`` is any callable returning logits (B, K, *spatial) — a network, a MONAI inferer wrapped as
a callable, :class:`common.sliding_window.SlidingWindowForward` — or a list/tuple of heads whose first
element is the main output. If ``forward`` has a method ``input_gradient(x, y, loss)`` (as
``SlidingWindowForward(aggregation="window_mean")`` does) the attack asks it for the gradient instead of
back-propagating through ``forward(x)``.

Guarantees: the model's mode (train/eval), its parameters and their ``.grad`` are left untouched (only
``torch.autograd.grad`` with respect to the input is used); the result is detached, has the input's
dtype, satisfies ‖x_adv − x‖∞ ≤ ε and lies inside ``clip``. Note that a model left in train mode keeps
its train-mode behaviour (dropout, batch-norm statistics updates) during the attack: put it in eval mode
first if that is not wanted.

Units: ε, α and ``clip`` are in the units of the tensor the network sees.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Sequence

import torch

from common.losses import OUTPUTS, pack_bits, resolve_loss
from common.validation import check_clip, check_image, check_label_map, check_nonnegative, main_output

__all__ = ["Attack", "PixelwiseAttack", "Number", "output_from_postprocessing"]

Number = float | int

#: inputs may exceed ``clip`` by this fraction of its width (float rounding of an intensity rescale)
CLIP_TOLERANCE = 1e-5


def _as_eps(value: Number | torch.Tensor | Sequence[Number], name: str) -> float | torch.Tensor:
    """A non-negative number, or a 1-D tensor of per-sample values (B,) — e.g. ε in z-units per CT case."""
    if isinstance(value, (torch.Tensor, list, tuple)):
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() == 1:
            return check_nonnegative(float(t), name)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name}: per-sample values must be finite and >= 0, got {t.tolist()}")
        return t
    return check_nonnegative(value, name)


def _broadcast(value: float | torch.Tensor, x: torch.Tensor, name: str) -> float | torch.Tensor:
    """A per-sample tensor (B,) reshaped to (B, 1, ..., 1) for ``x``; a number unchanged."""
    if isinstance(value, torch.Tensor):
        if value.numel() != x.shape[0]:
            raise ValueError(f"{name}: {value.numel()} per-sample values for a batch of {x.shape[0]}")
        return value.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return value


def _per_sample(value: float | torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """A number or per-sample tensor as a (B,) tensor of ``x``'s dtype and device."""
    if isinstance(value, torch.Tensor):
        return _broadcast(value, x, name).flatten()
    return torch.full((x.shape[0],), float(value), dtype=x.dtype, device=x.device)


def check_multilabel(y: torch.Tensor, x: torch.Tensor, name: str = "y") -> None:
    """A sigmoid network's target: a 0/1 mask (B, K, *spatial) matching ``x``'s batch and spatial shape."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(y).__name__}")
    if y.ndim != x.ndim or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        raise ValueError(f"{name}: expected a 0/1 mask (B, K, *spatial) for x of shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.numel() and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{name}: a sigmoid (multi-label) target must hold 0/1 per channel, found other values")


def output_from_postprocessing(postprocessing) -> str:
    """An attack's ``output`` read from a bundle's postprocessing: ``"sigmoid"`` when it applies MONAI's
    ``Activations`` / ``Activationsd`` with ``sigmoid=True`` (independent channels, e.g. BraTS WT / TC /
    ET), ``"softmax"`` with ``softmax=True``, otherwise ``"auto"``.

    ``postprocessing``: a ``Compose``, a list of transforms, or their parsed config (dicts with
    ``_target_``, as in ``inference.json``)."""
    items = getattr(postprocessing, "transforms", postprocessing)
    if isinstance(items, dict):
        items = items.get("transforms", [items])
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"postprocessing: expected a Compose, a list of transforms or their config, got {type(items).__name__}")
    found = "auto"
    for item in items:
        if isinstance(item, dict):
            name, flags = str(item.get("_target_", "")), (item.get("sigmoid"), item.get("softmax"))
        else:
            name, flags = type(item).__name__, (getattr(item, "sigmoid", None), getattr(item, "softmax", None))
        if not name.split(".")[-1].startswith("Activations"):
            continue
        sigmoid, softmax = (any(v) if isinstance(v, (list, tuple)) else bool(v) for v in flags)
        if sigmoid:
            return "sigmoid"
        if softmax:
            found = "softmax"
    return found


class Attack(abc.ABC):
    """Base class: validation, loss, input gradient, projection onto the ε-ball and ``clip``.

    Args:
        forward: callable ``x -> logits`` (or a list of heads, main first).
        eps: L∞ radius ε ≥ 0 (a number, or per-sample values of shape (B,)).
        loss: a name of :data:`common.losses.LOSS_NAMES` — ``"ce"``, ``"dice"`` (soft Dice of Liu et al.,
            J. Digit. Imaging 2021, Eq. 5–6, background excluded), ``"dicece"``, and the SEA losses
            ``"masked_ce"``, ``"balanced_masked_ce"``, ``"js"`` (Croce, Singh, Hein, ECCV 2024), the
            logit-scale-invariant ``"margin"`` and ``"rescaled_<name>"`` (e.g. ``"rescaled_dice"``) — or a
            callable ``(logits, y) -> scalar``.
        targeted: descend the loss toward target labels instead of ascending it away from ``y``.
        clip: ``(low, high)`` valid input range, or ``None``.
        target_fn: with ``targeted=True``, maps the true labels (B, 1, *spatial) to the target labels, so
            the attack is called with true labels like any other (e.g. :func:`inverted_target`, NLCEN;
            ``functools.partial(constant_target, label=1)``, the BraTS ti-FGSM). Without it, ``y`` passed to
            a targeted attack *is* the target.
        output: ``"auto"`` (softmax over K ≥ 2 channels, one sigmoid for K = 1), ``"softmax"`` or
            ``"sigmoid"`` (K independent binary channels — e.g. BraTS WT / TC / ET — with ``y`` a K-channel
            0/1 mask (B, K, *spatial) and every loss in its per-channel binary form).
        clip_input: an ``x`` outside ``clip`` is refused (``ValueError`` naming ``x`` and both ranges: the
            ε-ball around it would not meet ``clip``); with ``clip_input=True`` ``x`` is clipped into ``clip``
            first and the ε-ball is taken around the clipped input. Deviations up to 1e-5 of the clip width
            (float rounding) are accepted either way.

    Labels are checked against the network at the first forward pass of every call: softmax labels must
    lie in 0 … K − 1, a one-channel network's in {0, 1}, a sigmoid target needs one 0/1 channel per output
    channel; a violation raises ``ValueError`` naming ``y``.
    """

    #: +1 ascends the loss (untargeted), −1 descends it (targeted, inverse FGSM); set by ``__init__``.
    direction: int
    #: attributes holding per-sample (B,) values, re-indexed by :meth:`subset`
    per_sample_attributes: tuple[str, ...] = ("eps",)

    def __init__(
        self,
        forward: Callable,
        eps: Number | torch.Tensor,
        loss: str | Callable = "ce",
        targeted: bool = False,
        clip: Sequence[float] | None = None,
        target_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        output: str = "auto",
        clip_input: bool = False,
    ) -> None:
        if not callable(forward):
            raise ValueError(f"forward: expected a callable returning logits, got {type(forward).__name__}")
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        self.forward = forward
        self.eps = _as_eps(eps, "eps")
        self.output = output
        self.loss_fn = resolve_loss(loss, output)
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
        self.targeted = bool(targeted)
        self.clip = check_clip(clip)
        self.clip_input = bool(clip_input)
        self.direction = -1 if self.targeted else 1
        if target_fn is not None and not self.targeted:
            raise ValueError("target_fn: only a targeted attack (targeted=True) takes a target function")
        if target_fn is not None and not callable(target_fn):
            raise ValueError(f"target_fn: expected a callable, got {type(target_fn).__name__}")
        self.target_fn = target_fn
        self._pending_label_check: tuple[str, int, str] | None = None

    # -- the one thing a subclass writes -------------------------------------------------------------
    @abc.abstractmethod
    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The update rule: return x_adv from the clean ``x`` (detached) and labels ``y``."""

    # -- input checks ----------------------------------------------------------------------------------
    def _check_input_range(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            return x
        low, high = self.clip
        tol = CLIP_TOLERANCE * (high - low)
        x_min, x_max = float(x.min()), float(x.max())
        if x_min >= low - tol and x_max <= high + tol:
            return x
        if self.clip_input:
            return x.clamp(low, high)
        raise ValueError(
            f"x: values span [{x_min:.6g}, {x_max:.6g}], outside clip=({low:g}, {high:g}); the ε-ball around x "
            "would not meet the valid range — rescale x, widen clip, or pass clip_input=True to clip x first"
        )

    def _check_labels(self, y: torch.Tensor, x: torch.Tensor, name: str) -> None:
        """Shape and value checks that need no forward pass; the class count waits for the first one."""
        if self.output == "sigmoid":
            check_multilabel(y, x, name)
            self._pending_label_check = ("channels", int(y.shape[1]), name)
        else:
            check_label_map(y, x, name)
            self._pending_label_check = ("max", int(y.max()) if y.numel() else 0, name)

    def check_output(self, logits: torch.Tensor) -> None:
        """At the first forward pass of a call: the labels must fit the network's K output channels."""
        if self._pending_label_check is None:
            return
        kind, value, name = self._pending_label_check
        self._pending_label_check = None
        k = int(logits.shape[1])
        if self.output == "softmax" and k < 2:
            raise ValueError(f"output: softmax needs at least 2 output channels, the network gives {k}")
        if kind == "channels":
            if value != k:
                raise ValueError(f"{name}: {value} label channels for a sigmoid network with {k} output channels")
        elif k == 1:
            if value > 1:
                raise ValueError(f"{name}: label {value} for a one-channel (sigmoid) network; expected 0/1")
        elif value >= k:
            raise ValueError(f"{name}: class index {value} outside the network's {k} classes (0..{k - 1})")

    def _multilabel_packed(self, y: torch.Tensor) -> torch.Tensor:
        """Labels as a one-channel map for ``forward.input_gradient`` (sigmoid masks packed bitwise)."""
        return pack_bits(y) if self.output == "sigmoid" and y.shape[1] > 1 else y

    # -- shared machinery ------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image(x, "x")
        x = self._check_input_range(x.detach())
        self._check_labels(y, x, "y")
        if self.target_fn is not None:
            y = self.target_fn(y)
            self._check_labels(y, x, "target_fn(y)")
        try:
            with torch.enable_grad():
                x_adv = self.perturb(x, y)
        finally:
            self._pending_label_check = None
        return x_adv.detach().to(x.dtype)

    def checked_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's scalar loss of ``logits`` against ``y`` (labels checked at the first call)."""
        self.check_output(logits)
        return self.loss_fn(logits, y)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's loss of ``forward(x)`` against ``y`` (a scalar tensor)."""
        return self.checked_loss(main_output(self.forward(x)), y)

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇_x loss(forward(x), y), without accumulating parameter gradients."""
        custom = getattr(self.forward, "input_gradient", None)
        if callable(custom):
            grad = custom(x, self._multilabel_packed(y), self.checked_loss)
        else:
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(x, y), [x])
        if grad is None or not bool(torch.isfinite(grad).all()):
            raise ValueError("forward: the loss gradient with respect to x is not finite")
        return grad

    def step(self, x_adv: torch.Tensor, y: torch.Tensor, size: float | torch.Tensor) -> torch.Tensor:
        """One signed-gradient step of ``size`` in the attack's direction."""
        return x_adv + self.direction * _broadcast(size, x_adv, "alpha") * self.gradient(x_adv, y).sign()

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project onto the L∞ ball of radius ε around ``x``, then into ``clip``."""
        eps = _broadcast(self.eps, x, "eps")
        x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
        if self.clip is not None:
            x_adv = x_adv.clamp(*self.clip)
        return x_adv

    def uniform_start(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A uniform point of the ε-ball around ``x`` (projected into ``clip``)."""
        eps = _broadcast(self.eps, x, "eps")
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        return self.project(x + (2 * noise - 1) * eps, x)

    def subset(self, index: torch.Tensor) -> "Attack":
        """A shallow copy for the cases ``index`` of a batch (per-sample ε, α ... re-indexed)."""
        new = copy.copy(self)
        for name in self.per_sample_attributes:
            value = getattr(self, name, None)
            if isinstance(value, torch.Tensor) and value.ndim == 1 and value.numel() > 1:
                setattr(new, name, value[index.to(value.device)])
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, loss={self.loss_name!r}, targeted={self.targeted}, clip={self.clip})"


class PixelwiseAttack(Attack):
    """Base of the iterative attacks that need per-image loss values, per-pixel weights or a per-image
    choice of the returned iterate (APGD, SegPGD, CosPGD).

    Extra args:
        metric: optional ``(logits, y) -> (B,)``, lower is better for the attacker (e.g.
            :func:`common.attacks.case_dice`); when given, every iterate is scored from the logits the
            gradient pass already computed and each image's lowest-scoring iterate is returned (instead of
            the paper's rule: the last iterate, or APGD's highest-loss one).
        stop_metric: with ``metric``, stop once every image's best score is ≤ this value (e.g. Dice 0).
    """

    def __init__(self, *args, metric: Callable | None = None, stop_metric: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.loss_fn, "per_image"):
            raise ValueError(
                f"loss: {type(self).__name__} needs per-image loss values; give a name of common.losses.LOSS_NAMES "
                "or an object with per_image(logits, y, weight)"
            )
        if metric is not None and not callable(metric):
            raise ValueError(f"metric: expected a callable (logits, y) -> (B,), got {type(metric).__name__}")
        if stop_metric is not None and metric is None:
            raise ValueError("stop_metric: needs a metric")
        self.metric = metric
        self.stop_metric = None if stop_metric is None else float(stop_metric)

    def pixel_weight(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Per-pixel weights of the loss (B, *spatial) — or (B, K, *spatial) for sigmoid — or ``None``."""
        return None

    def objective(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image values (B,) the attack *maximises*: direction × weighted loss."""
        self.check_output(logits)
        weight = self.pixel_weight(logits.detach(), y)
        return self.direction * self.loss_fn.per_image(logits, y, weight)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, need_grad: bool = True):
        """``(objective (B,), gradient of its sum or None, logits)`` at ``x``; logits detached (main head).

        Through ``forward.input_gradient`` (window-mean aggregation) the gradient comes from the windows
        and the objective and logits from one extra stitched forward pass without a graph."""
        custom = getattr(self.forward, "input_gradient", None)
        grad = None
        if need_grad and callable(custom):
            grad = custom(x, self._multilabel_packed(y), lambda logits, t: self.objective(logits, t).sum())
            need_grad = False
        if need_grad:
            xg = x.detach().requires_grad_(True)
            logits = main_output(self.forward(xg))
            values = self.objective(logits, y)
            (grad,) = torch.autograd.grad(values.sum(), [xg])
        else:
            with torch.no_grad():
                logits = main_output(self.forward(x))
                values = self.objective(logits, y)
        if grad is not None and not bool(torch.isfinite(grad).all()):
            raise ValueError("forward: the loss gradient with respect to x is not finite")
        return values.detach(), grad, logits.detach()



class BestIterate:
    """Per-image bookkeeping of the returned iterate: the lowest ``metric`` (if given), ties to the earlier."""

    def __init__(self, attack: PixelwiseAttack, x: torch.Tensor) -> None:
        self.metric = attack.metric
        self.stop = attack.stop_metric
        self.x = x.clone()
        self.score = torch.full((x.shape[0],), float("inf"), dtype=torch.float64, device=x.device)

    def update(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        if self.metric is None:
            return
        score = torch.as_tensor(self.metric(logits, y), dtype=torch.float64, device=x.device).flatten()
        better = score < self.score
        self.score = torch.where(better, score, self.score)
        self.x[better] = x[better]

    def done(self) -> bool:
        return self.stop is not None and bool((self.score <= self.stop).all())
