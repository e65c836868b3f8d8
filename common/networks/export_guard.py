"""When a network's Python-only input checks may run.

The networks check their input (type, shape, finiteness) in eager mode and name the bad argument. Those
checks use Python objects (``isinstance``, f-strings of shapes) and data-dependent branches
(``bool(torch.isfinite(x).all())``), which ``torch.jit.script`` cannot compile and ``torch.jit.trace`` /
``torch.export`` (behind ``torch.onnx.export``'s dynamo exporter) cannot record. A ``forward`` therefore
guards them as::

    if not torch.jit.is_scripting():   # compile-time constant: TorchScript drops the whole block
        if checks_enabled():           # False while tracing or exporting
            self._check_input(x)
"""

from __future__ import annotations

import torch

__all__ = ["checks_enabled"]


def checks_enabled() -> bool:
    """True in eager PyTorch; False under ``torch.jit.trace`` and under ``torch.export`` / dynamo."""
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())
