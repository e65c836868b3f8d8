"""Initialise a network from a smaller trained one and freeze what was loaded (controlled ablations).

He et al., AAAI 2019 (NLCEN), "Ablation Studies": "we train the w/o NLCE model first. Then, we fine-tune
the w/o NL, w/o CE and NLCEN models separately by freezing the layers of the w/o NLCE model. Finally, we
fine-tune NLCEN without freezing any layer". :func:`init_from` is that step for any pair of networks
whose parameter names agree (NLCEN with and without NLCE modules do: the NLCE modules are extra keys).

MONAI's ``CheckpointLoader`` loads non-strictly but does not freeze, and a frozen layer's BatchNorm would
still move its running statistics in train mode; hence this helper.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["init_from"]


def _read_state(path: Path, key: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"init checkpoint: no such file {path} (train the stage before this one first)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated archives, disallowed globals
        raise ValueError(f"init checkpoint {path}: cannot be read as a PyTorch checkpoint ({err})") from err
    state = obj.get(key, obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"init checkpoint {path}: expected a state dict or a dict with key '{key}'")
    return state


def init_from(network: nn.Module, path: str | os.PathLike, freeze: bool = False, key: str = "model") -> nn.Module:
    """Load every tensor of the checkpoint at ``path`` into ``network``; with ``freeze``, freeze them.

    Args:
        network: the network to fine-tune; it may have parameters the checkpoint lacks (new modules, e.g.
            NLCE), but every checkpoint tensor must exist in it with the same shape.
        path: ``{key: state_dict}`` (the bundles' ``model.pt``) or a bare state dict.
        freeze: False: the checkpoint must cover the whole network (a plain continuation, "without
            freezing any layer"). True: the loaded parameters get ``requires_grad = False`` (optimizers
            then skip them: no gradient, no weight decay), and every BatchNorm whose parameters are all
            frozen keeps its running statistics (momentum 0), so the frozen part computes exactly what
            it computed in the checkpointed model at evaluation time.

    Returns ``network`` (modes unchanged). ValueError naming the file for unexpected or mis-shaped keys,
    for ``freeze=False`` with keys missing from the checkpoint, and for ``freeze=True`` leaving nothing
    to train.
    """
    path = Path(path)
    state = _read_state(path, key)
    own = network.state_dict()
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if unexpected or shaped:
        raise ValueError(
            f"init checkpoint {path}: does not fit {type(network).__name__}: unexpected keys {unexpected[:5]}, "
            f"mis-shaped {shaped[:5]}"
        )
    missing = [k for k in own if k not in state]
    if missing and not freeze:
        raise ValueError(f"init checkpoint {path}: lacks {len(missing)} tensors of the network, e.g. {missing[:5]}")
    network.load_state_dict(state, strict=False)
    if not freeze:
        return network
    for name, p in network.named_parameters():
        if name in state:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in network.parameters()):
        raise ValueError(f"init checkpoint {path}: covers every parameter, freeze=True leaves nothing to train")
    for module in network.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in params):
            module.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    return network
