"""The forward contract of attacks and certification, and the rule wrappers follow to keep gradients.

A *forward* is any callable ``forward(x) -> logits`` (B, K, *spatial) from an input x (B, C, *spatial)
(or a list of heads, main first): a network, a sliding-window inferer, the C2F pipeline. Attacks
differentiate a loss of it with respect to x. Most forwards leave that to autograd. Some supply their
own input gradient, ``forward.input_gradient(x, y, loss) -> ∂loss/∂x`` (B, C, *spatial), that is NOT
autograd through ``forward(x)``: the ResDSN paper's window-mean aggregation (Li et al., 2019, "Volumetric
Medical Image Segmentation: A 3D Deep Coarse-to-Fine Framework and Its Adversarial Examples", Springer,
Sec. 3.3; ``SlidingWindowForward(aggregation="window_mean")``) averages each window's own loss gradient.
:class:`InputGradientForward` names that contract.

A wrapper around such a forward must keep its gradient, or an attack through the wrapper silently
falls back to autograd and attacks a different function. This module makes that hold by construction:

- :class:`InputTransformForward` is the base of wrappers ``forward(x) = inner(transform(x))`` (per-case
  normalisation, :class:`common.networks.normalise.PerCaseZNorm`). It has ``input_gradient`` exactly when
  ``inner`` has one, and computes it by the chain rule: the inner gradient at t = transform(x) pulled
  back through ``transform`` (a vector-Jacobian product by autograd, or a subclass's closed form). A
  subclass writes only ``transform``; it cannot forget the gradient.
- :func:`check_autograd_forward` is for wrappers that can only differentiate by autograd (the exact
  sliding-window aggregation, MONAI's sliding window with the paper's n, the C2F logits): they refuse a
  forward that supplies its own gradient, with a one-line error, instead of ignoring it.
- :func:`input_gradient` is the gradient a caller should use: the forward's own, else autograd.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Protocol

import torch

from common.validation import main_output

__all__ = [
    "InputGradientForward",
    "InputTransformForward",
    "supplies_input_gradient",
    "input_gradient",
    "check_autograd_forward",
]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _SuppliesInputGradient(type(Protocol)):
    """``isinstance`` by the instance: wrappers have ``input_gradient`` only when what they wrap has one
    (a property raising AttributeError otherwise), which ``runtime_checkable``'s class-level check misses."""

    def __instancecheck__(cls, instance: object) -> bool:
        return callable(instance) and supplies_input_gradient(instance)


class InputGradientForward(Protocol, metaclass=_SuppliesInputGradient):
    """A forward that supplies its own input gradient.

    ``__call__(x)`` gives logits (B, K, *spatial) (or a list of heads, main first);
    ``input_gradient(x, y, loss)`` gives ∂loss/∂x (B, C, *spatial) for labels y (B, 1, *spatial) and a
    ``loss(logits, y) -> scalar``, by a rule of its own rather than autograd through ``__call__``.
    ``isinstance(f, InputGradientForward)`` tests for it on the instance.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def input_gradient(self, x: torch.Tensor, y: torch.Tensor, loss: Loss) -> torch.Tensor: ...


def supplies_input_gradient(forward: object) -> bool:
    """True when ``forward`` has a callable ``input_gradient`` (:class:`InputGradientForward`)."""
    return callable(getattr(forward, "input_gradient", None))


def input_gradient(forward: Callable, x: torch.Tensor, y: torch.Tensor, loss: Loss) -> torch.Tensor:
    """∂loss(forward(x), y)/∂x: ``forward.input_gradient`` if it supplies one, else autograd of
    ``loss(main_output(forward(x)), y)``. x (B, C, *spatial) is not modified; no parameter gradient is
    accumulated."""
    if supplies_input_gradient(forward):
        return forward.input_gradient(x, y, loss)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss(main_output(forward(x)), y), [x])
    return grad


def check_autograd_forward(forward: Callable, name: str, wrapper: str) -> Callable:
    """Refuse ``forward`` if it supplies its own input gradient: ``wrapper`` differentiates through it by
    autograd and would silently drop that gradient. Returns ``forward``."""
    if supplies_input_gradient(forward):
        raise ValueError(
            f"{name}: {type(forward).__name__} supplies its own input_gradient, which {wrapper} cannot "
            "keep (it differentiates by autograd); give a forward without one (e.g. aggregation='exact')"
        )
    return forward


class InputTransformForward(abc.ABC):
    """Base of wrappers ``forward(x) = inner(transform(x))`` that keep the inner forward's gradient.

    Args:
        inner: the wrapped forward ``t -> logits``; it may be an :class:`InputGradientForward`.

    ``input_gradient`` exists exactly when ``inner`` supplies one (``hasattr`` and ``isinstance(...,
    InputGradientForward)`` follow it) and is ∂L/∂x = J_transform(x)ᵀ · inner.input_gradient(transform(x),
    y, loss), the chain rule. Otherwise attacks differentiate ``__call__`` by autograd, which is the same
    chain rule. Subclasses define :meth:`transform` (differentiable in x) and may override
    :meth:`pullback` with a closed form.
    """

    def __init__(self, inner: Callable) -> None:
        if not callable(inner):
            raise ValueError(f"inner: expected a callable forward, got {type(inner).__name__}")
        self.inner = inner

    @abc.abstractmethod
    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The differentiable map from this forward's input to the inner forward's input."""

    def pullback(self, x: torch.Tensor, grad_t: torch.Tensor) -> torch.Tensor:
        """∂L/∂x from ∂L/∂t at t = transform(x): the vector-Jacobian product, by autograd."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.transform(x), [x], grad_outputs=grad_t)
        return grad

    def __call__(self, x: torch.Tensor):
        return self.inner(self.transform(x))

    @property
    def input_gradient(self) -> Callable[[torch.Tensor, torch.Tensor, Loss], torch.Tensor]:
        """The inner forward's own gradient chained through :meth:`transform` (AttributeError, hence
        ``hasattr`` False, when the inner forward has none)."""
        inner_gradient = getattr(self.inner, "input_gradient", None)
        if not callable(inner_gradient):
            raise AttributeError(
                f"{type(self).__name__}: the inner forward has no input_gradient (autograd through the call "
                "is the gradient)"
            )

        def gradient(x: torch.Tensor, y: torch.Tensor, loss: Loss) -> torch.Tensor:
            x = x.detach()
            with torch.no_grad():
                t = self.transform(x)
            return self.pullback(x, inner_gradient(t, y, loss))

        return gradient

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"
