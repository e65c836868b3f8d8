"""Experiment tracking of a bundle's training run: TensorBoard event files (train.json's
``TensorBoardStatsHandler`` on the trainer and the validator, under ``tensorboard_dir``), the progress bar
(``ignite.handlers.ProgressBar``, switched by ``progress_bar``) and ``--tracking mlflow`` (MONAI's
``DEFAULT_MLFLOW_SETTINGS`` patched onto the ids ``train#trainer`` / ``validate#evaluator``).

Both runs are the tiny 1-epoch ``unet3d_brats_distill`` demo (2 training cases, batch 1: 2 iterations).
The TensorBoard file is read back with tensorboard's ``EventAccumulator``, the MLflow store with
``mlflow.MlflowClient``; the epoch's ``train_loss`` (ignite ``Average`` over the iterations) is checked
against the mean of the per-iteration losses each tracker recorded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bundle_run import BUNDLES, run_bundle

NAME = "unet3d_brats_distill"


def _tiny(root: Path) -> dict:
    return {
        "demo_dir": str(root),
        "phantom_size": [24, 24, 24],
        "image_size": [16, 16, 16],
        "phantom_cases": 5,
        "phantom_fractions": [0.4, 0.2, 0.4],  # 2 training, 1 validation, 2 test cases
        "max_epochs": 1,
    }


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of every events file in ``log_dir`` as (step, value) lists."""
    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard events file in {log_dir}"
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_events_and_progress_bar(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = run_bundle(NAME, ["train.json", "demo.json"], _tiny(tmp_path))
    scalars = _scalars(tmp_path / "eval" / "unet3d" / "tensorboard")
    iteration = scalars["train_loss_iteration"]
    assert [s for s, _ in iteration] == [1, 2]
    assert all(0.0 <= v <= 1.0 for _, v in iteration)  # soft Dice loss
    (epoch, train_loss), = scalars["train_loss"]
    assert epoch == 1 and math.isclose(train_loss, sum(v for _, v in iteration) / 2, rel_tol=1e-5)
    (val_epoch, dice), = scalars["val_mean_dice"]
    assert val_epoch == 1 and 0.0 <= dice <= 1.0
    # stderr is a pipe here, not a terminal: common.progress.ProgressBar draws no bar frames into it
    # (a CI log would otherwise hold every frame), while the epoch's log records are there
    assert not re.search(r"\[[12]/2\]", proc.stderr), proc.stderr[-2000:]
    assert re.search(r"Epoch: 1/1", proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-2000:]

    # progress_bar=false drops the bar from the trainer's handlers; the other handlers stay
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / NAME / "configs" / c) for c in ("train.json", "demo.json")])
    parser["bundle_root"] = str(BUNDLES / NAME)
    for key, value in {**_tiny(tmp_path), "progress_bar": False}.items():
        parser[key] = value
    names = [type(h).__name__ for h in parser.get_parsed_content("train#handlers")]
    assert names == ["ValidationHandler", "StatsHandler", "TensorBoardStatsHandler"]
    parser["progress_bar"] = True
    parser.parse()
    assert [type(h).__name__ for h in parser.get_parsed_content("train#handlers")][-1] == "ProgressBar"


def test_mlflow_tracking_records_the_run(tmp_path, monkeypatch):
    """``--tracking mlflow`` as model-zoo bundles use it. MONAI 1.6.1's ``MLFlowHandler`` rejects ``file:``
    stores (MLflow >= 3.13 dropped them), so the store is a SQLite file; artifacts land next to it."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run_bundle(NAME, ["train.json", "demo.json"], {
        **_tiny(tmp_path), "tracking": "mlflow", "tracking_uri": uri, "experiment_name": "tiny_unet3d",
    })
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny_unet3d")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the trainer's and the validator's handlers log into one run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["max_epochs"] == "1" and run.data.params["epoch_length"] == "2"
    # MONAI logs the iteration losses (steps 1, 2) and the epoch's Average (step 1) under one name
    losses = sorted(m.value for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert len(losses) == 3 and all(0.0 <= v <= 1.0 for v in losses)  # soft Dice loss
    assert math.isclose(losses[1], (losses[0] + losses[2]) / 2, rel_tol=1e-5)  # the mean lies between
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert [m.step for m in dice] == [1] and 0.0 <= dice[0].value <= 1.0
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any(p.startswith("config_") and p.endswith(".json") for p in artifacts), artifacts
