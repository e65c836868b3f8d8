"""Scale-out helpers for ``torchrun``: process-group set-up, sharding of evaluation work, gathering.

Training under ``torchrun`` is MONAI / ignite's own business (``DistributedDataParallel``, MONAI's
``DistributedSampler``, metrics that gather across ranks); the bundles' ``multi_gpu_train.json`` wire it
the way model-zoo bundles do and use :func:`init_from_env`, :func:`device_from_env` and
:func:`rank0_handlers` from here. Robustness sweeps and certification are not ignite workflows: they
use :func:`shard_batches` to give each rank a contiguous block of batches and :func:`gather_objects` to
bring the per-batch results back in the original order, so rank 0 writes exactly the reports a single
process would.

Every function is a no-op (one rank, nothing sharded) when no process group is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, SequentialSampler

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "device_from_env",
    "init_from_env",
    "destroy",
    "shard",
    "shard_batches",
    "num_local_batches",
    "barrier",
    "gather_objects",
    "rank0_handlers",
]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a single process."""
    return get_rank() == 0


def device_from_env() -> torch.device:
    """``cuda:LOCAL_RANK`` if CUDA is available (``LOCAL_RANK`` set by ``torchrun``, default 0), else CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by ``torchrun``'s environment; return whether one is initialised.

    Backend: NCCL on GPU (each rank then uses ``cuda:LOCAL_RANK``), gloo on CPU, unless ``backend`` is
    given. A no-op returning False when ``WORLD_SIZE`` is unset (a plain ``python -m monai.bundle run``),
    and returning True when a group is already initialised.
    """
    if is_distributed():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE: set, but this PyTorch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo", "mpi", "ucc"):
        raise ValueError(f"backend: expected 'nccl', 'gloo', 'mpi' or 'ucc', got {backend!r}")
    if cuda:
        torch.cuda.set_device(device_from_env())
    dist.init_process_group(backend=backend)
    return True


def destroy() -> None:
    """Leave the process group, if any (the ``finalize`` step of the multi-GPU configs)."""
    if is_distributed():
        dist.destroy_process_group()


def shard(items: Sequence[Any], rank: int | None = None, world_size: int | None = None) -> list[Any]:
    """The contiguous block of ``items`` that belongs to ``rank`` out of ``world_size``.

    Blocks follow ``numpy.array_split``: the first ``len(items) % world_size`` ranks get one item more.
    Concatenating the blocks of ranks 0, 1, ... gives ``items`` back, every item exactly once.
    Defaults: this process's rank and world size.
    """
    rank = get_rank() if rank is None else int(rank)
    world_size = get_world_size() if world_size is None else int(world_size)
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
    items = list(items)
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (rank < extra)]


def _batch_size(batch: Any) -> int:
    """Cases in a dict batch: the leading size of its first tensor (1 if it holds none)."""
    if isinstance(batch, dict):
        values = list(batch.values())
    else:
        values = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 1


def shard_batches(data: Iterable[Any]) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(batch_index, case_offset, batch)`` for the batches of ``data`` that belong to this rank.

    ``batch_index`` counts the batches of the whole data set and ``case_offset`` the cases before this
    batch, so results can be put back in order after :func:`gather_objects`. Without a process group
    every batch is yielded, as ``enumerate`` would.

    With one, a ``DataLoader`` over a map-style dataset in order (``shuffle=False``) is re-built on the
    same dataset, collate function and workers with a batch sampler holding only this rank's contiguous
    block (:func:`shard`) of its batches: each rank loads only its own cases, and batches hold the same
    cases as in a single process. Any other iterable is read whole on every rank and batch ``k`` kept on
    rank ``k % world_size`` (its cases are loaded everywhere; the results are the same).
    """
    if not is_distributed():
        offset = 0
        for k, batch in enumerate(data):
            yield k, offset, batch
            offset += _batch_size(batch)
        return
    if isinstance(data, DataLoader) and data.batch_sampler is not None:
        if not isinstance(data.sampler, SequentialSampler):
            raise ValueError(
                f"data: a sharded evaluation needs a DataLoader with shuffle=False and no sampler; "
                f"got {type(data.sampler).__name__}"
            )
        batches = [list(b) for b in data.batch_sampler]
        offsets = [0]
        for b in batches[:-1]:
            offsets.append(offsets[-1] + len(b))
        mine = shard(range(len(batches)))
        kwargs: dict[str, Any] = dict(
            batch_sampler=[batches[k] for k in mine], num_workers=data.num_workers,
            collate_fn=data.collate_fn, pin_memory=data.pin_memory, timeout=data.timeout,
            worker_init_fn=data.worker_init_fn,
        )
        if data.num_workers > 0:
            kwargs.update(
                prefetch_factor=data.prefetch_factor, multiprocessing_context=data.multiprocessing_context
            )
        loader = DataLoader(data.dataset, **kwargs)
        for k, batch in zip(mine, loader):
            yield k, offsets[k], batch
        return
    rank, world = get_rank(), get_world_size()
    offset = 0
    for k, batch in enumerate(data):
        if k % world == rank:
            yield k, offset, batch
        offset += _batch_size(batch)


def barrier() -> None:
    """Wait for every rank (no-op in one process): after rank 0 writes, so that files exist everywhere."""
    if is_distributed():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, ordered by rank (``torch.distributed.all_gather_object``); ``[obj]`` alone.

    ``obj`` must be picklable; tensors should be on the CPU.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _output_handler_types() -> tuple[type, ...]:
    """Handler classes that only write (logs, TensorBoard, checkpoints, CSVs, progress bars)."""
    from ignite.handlers import Checkpoint
    from ignite.handlers.base_logger import BaseLogger
    from monai import handlers as mh

    names = ("StatsHandler", "TensorBoardHandler", "CheckpointSaver", "MetricsSaver", "ClassificationSaver",
             "MLFlowHandler", "ClearMLHandler", "LogfileHandler")
    types = [getattr(mh, n) for n in names if hasattr(mh, n)]
    return (Checkpoint, BaseLogger, *types)


def _is_output_handler(handler: Any, types: tuple[type, ...]) -> bool:
    if getattr(handler, "main_process_only", False) or isinstance(handler, types):
        return True
    return type(handler).__name__.endswith("ProgressBar")


def _discard_writer(handler: Any) -> None:
    """Close the TensorBoard writer a dropped handler opened and remove the empty event file it created
    on construction (``SummaryWriter`` creates its file at once), so rank 0's is the only one."""
    writer = getattr(handler, "_writer", None)
    if writer is None or not getattr(handler, "internal_writer", False):
        return
    event_writer = getattr(getattr(writer, "file_writer", None), "event_writer", None)
    path = getattr(event_writer, "_file_name", None)
    writer.close()
    if path and os.path.isfile(path):
        os.remove(path)


def rank0_handlers(handlers: Sequence[Any] | None, extra_types: Sequence[type] = ()) -> list[Any]:
    """``handlers`` on rank 0; on the other ranks only those that take part in training.

    Dropped off ranks > 0: handlers that only write — MONAI's ``StatsHandler``, TensorBoard handlers,
    ``CheckpointSaver``, ``MetricsSaver``, ``ClassificationSaver``, MLflow / ClearML, ignite checkpoints
    and loggers (including ``ProgressBar``), any class named ``*ProgressBar``, any object with
    ``main_process_only = True`` (the project's own writers, e.g. ``common.handlers.MetricHistory``, declare
    it: this module knows no domain class), and ``extra_types``. Kept everywhere:
    the rest (``ValidationHandler``, ``LrScheduleHandler``, early stopping ...), which must run on every
    rank. Identifying handlers by type rather than position keeps this right when handler lists change.
    """
    handlers = [] if handlers is None else list(handlers)
    if is_main_process():
        return handlers
    types = _output_handler_types() + tuple(extra_types)
    kept = []
    for h in handlers:
        if _is_output_handler(h, types):
            _discard_writer(h)
        else:
            kept.append(h)
    return kept


def num_local_batches(data: Iterable[Any]) -> int | None:
    """How many batches :func:`shard_batches` will yield here (for a progress bar), or None if unknown."""
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
    if not is_distributed():
        return total
    if isinstance(data, DataLoader):
        return len(shard(range(total)))
    return len(range(get_rank(), total, get_world_size()))
