"""Workflow pieces that bundle configs instantiate around MONAI's ``SupervisedTrainer``.

Each defence is an ``iteration_update`` callable (``SupervisedTrainer(..., iteration_update=...)``) that
keeps the trainer's contract — it prepares the batch with ``engine.prepare_batch``, puts the network in
train mode, fires MONAI's ``IterationEvents`` and returns ``{"image", "label", "pred", "loss"}`` — so
every MONAI handler (``StatsHandler``, ``CheckpointSaver``, metrics, TensorBoard, MLflow) works unchanged.
Only the objective differs:

- :class:`AdversarialTrainingIteration`: Eq. 9 of Liu et al., J. Digit. Imaging 2021 (β·clean + (1 − β)·adversarial), or the
  ResDSN paper's PGD training (β = 0).
- :class:`NoiseAugmentationIteration`: the uniform-noise baseline of Liu et al., J. Digit. Imaging 2021 (radius 0.01); both
  take ``sequential`` (the paper's per-batch order: a step on the perturbed batch, then one on the clean batch).
- :class:`DistillationIteration`: the student of defensive distillation trained on the teacher's
  temperature-T soft labels with the soft Dice of Eq. 7.

MONAI has no adversarial or distillation trainer, hence these. Mixed precision and gradient
accumulation are not supported by these iterations (CPU-first project); they raise if configured.
"""

from __future__ import annotations

import abc
import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from common.defenses import adversarial_objective, teacher_soft_labels, uniform_noise
from common.io import atomic_write_text
from common.losses import DistillationDiceLoss
from common.validation import check_nonnegative, main_output

__all__ = [
    "AdversarialTrainingIteration", "NoiseAugmentationIteration", "DistillationIteration", "MetricHistory",
    "resume_from_latest",
]


class _ObjectiveIteration:
    """Shared iteration: batch → ``objective(engine, x, y) -> (loss, pred)`` → backward → optimizer step."""

    def objective(self, engine, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the scalar loss to minimise and the prediction to report (the clean one where computed)."""
        return engine.loss_function(engine.network(x), y).mean(), None

    def __call__(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("batchdata: the data loader returned None")
        if getattr(engine, "amp", False) or getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError(f"{type(self).__name__}: amp and gradient accumulation are not supported")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x, y = batch[0], batch[1]
        engine.state.output = {Keys.IMAGE: x, Keys.LABEL: y}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss, pred = self.objective(engine, x, y)
        if pred is None:
            with torch.no_grad():
                pred = main_output(engine.network(x))
        engine.state.output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class _PerturbedIteration(_ObjectiveIteration, abc.ABC):
    """β·L(x, y) + (1 − β)·L(x', y) for a perturbed batch x' (adversarial or noisy), in one step or, with
    ``sequential``, as two steps per batch: first on (1 − β)·L(x', y), then on β·L(x, y) with the updated
    weights (Liu et al., J. Digit. Imaging 2021: "for each batch of input data, we first trained the model
    with the perturbed images and then trained the model with the clean images"). The reported loss is
    the sum of both terms. Subclasses give the perturbed term and the joint one."""

    def __init__(self, beta: float, sequential: bool) -> None:
        if not isinstance(sequential, bool):
            raise ValueError(f"sequential: expected True or False, got {sequential!r}")
        self.beta = float(beta)
        self.sequential = sequential

    @abc.abstractmethod
    def perturbed_loss(self, engine, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L(x', y), unweighted, from the current weights."""

    @abc.abstractmethod
    def joint_objective(self, engine, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor):
        """``(β·L(x, y) + (1 − β)·L(x', y), clean prediction or None)`` for one optimizer step."""

    def objective(self, engine, x, y):
        loss_fn = lambda pred, target: engine.loss_function(pred, target).mean()  # noqa: E731
        if not self.sequential:
            loss, pred = self.joint_objective(engine, loss_fn, x, y)
            return loss, None if pred is None else main_output(pred)
        # first update: the perturbed batch from the current weights
        loss_perturbed = (1.0 - self.beta) * self.perturbed_loss(engine, loss_fn, x, y)
        loss_perturbed.backward()
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        pred = engine.network(x)  # second update (by the caller): the clean batch, updated weights
        loss_clean = self.beta * loss_fn(pred, y)
        return loss_clean + loss_perturbed.detach(), main_output(pred)


class AdversarialTrainingIteration(_PerturbedIteration):
    """Adversarial training: minimise β·L(x, y) + (1 − β)·L(x_adv, y) with x_adv from the current model.

    Args:
        attack: an attack built on the trainer's network, e.g. ``FGSM(@network, eps=0.05, loss="dice")``
            (Liu et al., J. Digit. Imaging 2021, β = 0.5) or ``PGD(@network, eps, alpha, steps)`` (Li et al., 2019 (ResDSN C2F), β = 0).
        beta: weight β of the clean loss in [0, 1].
        sequential: False (default): one optimizer step on the weighted sum. True: the paper's
            procedure ("for each batch of input data, we first trained the model with the perturbed
            images and then trained the model with the clean images", Liu et al. 2021): one step on
            (1 − β)·L(x_adv, y), then a second step on β·L(x, y) with the updated weights (two forward
            and backward passes per batch, as the paper counts). The reported loss is the sum of both.

    An ``attack`` with a ``for_batch(batchdata, device)`` method is asked for the batch's own attack at
    every iteration (e.g. :class:`common.ct_window.WindowPGD`: ε per case from statistics the batch carries).
    """

    def __init__(self, attack: Callable, beta: float = 0.5, sequential: bool = False) -> None:
        if not callable(attack):
            raise ValueError("attack: expected an attack object built on the network")
        super().__init__(beta, sequential)
        self.attack = attack
        self._batch_attack = attack

    def __call__(self, engine, batchdata: dict) -> dict:
        for_batch = getattr(self.attack, "for_batch", None)
        if for_batch is not None and batchdata is not None:
            self._batch_attack = for_batch(batchdata, engine.state.device)
        return super().__call__(engine, batchdata)

    def perturbed_loss(self, engine, loss_fn, x, y):
        # β = 0 gives L(x_adv, y) alone
        return adversarial_objective(engine.network, loss_fn, x, y, self._batch_attack, 0.0)[0]

    def joint_objective(self, engine, loss_fn, x, y):
        loss, pred, _ = adversarial_objective(engine.network, loss_fn, x, y, self._batch_attack, self.beta)
        return loss, pred


class NoiseAugmentationIteration(_PerturbedIteration):
    """The uniform-noise baseline of Liu et al., J. Digit. Imaging 2021: the loss of a batch perturbed by
    uniform noise of L∞ radius r plus the loss of the clean batch, weighted β and 1 − β like Eq. 9
    (β = 0.5: both halves count equally).

    ``sequential`` as in :class:`AdversarialTrainingIteration`: False (default) one step on the weighted
    sum; True one step on (1 − β)·L(x + noise, y), then one on β·L(x, y) with the updated weights, the
    paper's per-batch order for its training-time defences.
    """

    def __init__(self, radius: float = 0.01, beta: float = 0.5, seed: int | None = None,
                 sequential: bool = False) -> None:
        super().__init__(beta, sequential)
        self.radius = check_nonnegative(radius, "radius")
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def perturbed_loss(self, engine, loss_fn, x, y):
        return loss_fn(engine.network(uniform_noise(x, self.radius, self.generator)), y)

    def joint_objective(self, engine, loss_fn, x, y):
        noisy = uniform_noise(x, self.radius, self.generator)
        pred = engine.network(x)
        loss = self.beta * loss_fn(pred, y) + (1.0 - self.beta) * loss_fn(engine.network(noisy), y)
        return loss, pred


class DistillationIteration(_ObjectiveIteration):
    """Defensive distillation, second stage: the student F^d (the trainer's network) learns the teacher's
    soft labels F(X) = softmax(z/T) with the soft Dice of Eq. 7 (:class:`common.losses.DistillationDiceLoss`).

    The trainer's own ``loss_function`` is not used. The teacher is loaded by the config (a network with
    its checkpoint) and stays frozen.
    """

    def __init__(self, teacher: nn.Module, temperature: float, gamma: float = 1e-5) -> None:
        self.teacher = teacher
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.temperature = check_nonnegative(temperature, "temperature")
        self.loss = DistillationDiceLoss(temperature=self.temperature, gamma=gamma, teacher_is_logits=False)

    def objective(self, engine, x, y):
        soft = teacher_soft_labels(self.teacher, x, self.temperature)
        pred = main_output(engine.network(x))
        return self.loss(pred, soft), pred


def resume_from_latest(trainer, ckpt_dir: str, load_dict: dict, prefix: str = "checkpoint",
                       keep: int | None = None) -> str | None:
    """Attach a MONAI ``CheckpointLoader`` that restores ``load_dict`` (model, optimizer, trainer state,
    scheduler, the validator's best metric ...) from the newest ``<prefix>_checkpoint_epoch=N.pt`` in
    ``ckpt_dir``, so an interrupted training run continues at epoch N + 1; with ``keep``, older resumable
    checkpoints are pruned to that number. See :func:`common.checkpoint.resume_training`. Returns the
    checkpoint's path, or ``None`` (nothing loaded) when the directory holds no checkpoint yet."""
    from common.checkpoint import resume_training

    return resume_training(trainer, ckpt_dir, load_dict, prefix, keep)


class MetricHistory:
    """Ignite handler for an evaluator: append its metrics after every run to a CSV (rewritten atomically).

    Rows: ``epoch`` (the evaluator's ``state.epoch``, which MONAI's ``ValidationHandler`` sets to the
    trainer's epoch) and one column per metric in ``metric_names`` (default: all). Table 1 of Pervin et
    al., arXiv:2105.12106 (IoU over epochs) is assembled from these files by
    :func:`common.reporting.advaug_tables.iou_over_epochs_table`. A new training run starting at epoch 1
    starts a new file; a resumed one (first epoch > 1) keeps the file's earlier epochs. It only writes, so :func:`common.distributed.rank0_handlers` keeps it on rank 0
    alone (``main_process_only``).
    """

    main_process_only = True

    def __init__(self, path: str | os.PathLike, metric_names: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.metric_names = list(metric_names) if metric_names is not None else None
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _earlier_rows(self, names: Sequence[str], epoch: int) -> list[dict[str, Any]]:
        """Rows before ``epoch`` in the existing file with the same columns (none if it is unreadable)."""
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != ["epoch", *names]:
                    return []
                rows = [{"epoch": int(r["epoch"]), **{n: float(r[n]) for n in names}} for r in reader]
        except (OSError, ValueError, TypeError, KeyError):
            return []
        return [r for r in rows if r["epoch"] < epoch]

    def __call__(self, engine) -> None:
        metrics = engine.state.metrics
        names = self.metric_names if self.metric_names is not None else sorted(metrics)
        missing = [n for n in names if n not in metrics]
        if missing:
            raise ValueError(f"metric_names: {missing} not among the evaluator's metrics {sorted(metrics)}")
        epoch = int(engine.state.epoch)
        if not self.rows and epoch > 1:  # resumed: the rows of the interrupted run's epochs
            self.rows = self._earlier_rows(names, epoch)
        self.rows = [r for r in self.rows if r["epoch"] < epoch]
        self.rows.append({"epoch": epoch, **{n: float(metrics[n]) for n in names}})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["epoch", *names], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
