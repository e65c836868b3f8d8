"""Resuming a training run never replaces better weights (issue #16 item 1).

A real MONAI ``SupervisedTrainer`` validates a 1×1 convolution of weight w every epoch with a
``SupervisedEvaluator`` whose key metric is the MSE between ``w·x`` and ``x`` — (w − 1)² · mean(x²), hand
computed, lower is better — and ``WeightsSaver(when="best")`` writes ``model.pt``. The first run trains
at w = 1.1; the resumed run's "training" sets w = 3 (a worse model) for one epoch, then w = 1 (a better
one). Restoring the validator's best metric keeps model.pt at 1.1 after the worse epoch and still saves
the better one; without it (the bug) the worse model replaces it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointSaver, MeanSquaredError, ValidationHandler, from_engine

from bundle_run import BUNDLES
from common.checkpoint import BestMetricState, WeightsSaver, latest_checkpoint, prune_checkpoints
from common.handlers import resume_from_latest

X = torch.arange(1.0, 9.0).reshape(2, 1, 2, 2)
MEAN_X2 = float((X**2).mean())  # 25.5


def _run(tmp_path, weights: list[float], max_epochs: int, resume: bool, with_best: bool, n_saved: int = 1):
    """One training process: epoch e sets w = weights[e - start]; returns the evaluator."""
    net = nn.Conv2d(1, 1, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=[{"image": X, "label": X}], network=net,
        key_val_metric={"mse": MeanSquaredError(output_transform=from_engine(["pred", "label"]))},
        metric_cmp_fn=lambda current, best: current < best,
        val_handlers=[WeightsSaver(net, tmp_path, when="best")],
    )
    schedule = iter(weights)

    def iteration(engine, batch):  # "training": the weight the schedule prescribes for this epoch
        with torch.no_grad():
            net.weight.fill_(next(schedule))
        return {"loss": torch.tensor(0.0)}

    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=[{"image": X, "label": X}],
        network=net, optimizer=opt, loss_function=nn.MSELoss(), iteration_update=iteration,
        train_handlers=[ValidationHandler(validator=evaluator, epoch_level=True, interval=1)],
    )
    state = {"model": net, "optimizer": opt, "trainer": trainer}
    if with_best:
        state["validator"] = BestMetricState(evaluator)
    CheckpointSaver(save_dir=str(tmp_path), save_dict=state, save_interval=1, n_saved=n_saved,
                    file_prefix="checkpoint", epoch_level=True).attach(trainer)
    if resume:
        resume_from_latest(trainer, str(tmp_path), dict(state), keep=n_saved)
    trainer.run()
    return evaluator


def _saved_weight(tmp_path) -> float:
    return float(torch.load(tmp_path / "model.pt", weights_only=True)["model"]["weight"].flatten()[0])


def _epochs(tmp_path) -> list[int]:
    return sorted(int(p.stem.split("=")[1]) for p in tmp_path.glob("checkpoint_*epoch=*.pt"))


def test_resume_keeps_better_weights_and_prunes_old_checkpoints(tmp_path):
    first = _run(tmp_path, [1.2, 1.1], max_epochs=2, resume=False, with_best=True)
    assert first.state.best_metric == pytest.approx(0.01 * MEAN_X2)
    assert _saved_weight(tmp_path) == pytest.approx(1.1) and _epochs(tmp_path) == [2]

    # the resumed run: epoch 3 is far worse (w = 3, MSE 4 · 25.5), epoch 4 is perfect (w = 1, MSE 0)
    resumed = _run(tmp_path, [3.0], max_epochs=3, resume=True, with_best=True)
    assert resumed.state.metrics["mse"] == pytest.approx(4.0 * MEAN_X2)
    assert resumed.state.best_metric_epoch == 2 and resumed.state.best_metric == pytest.approx(0.01 * MEAN_X2)
    assert _saved_weight(tmp_path) == pytest.approx(1.1)  # model.pt not replaced by the worse model
    assert _epochs(tmp_path) == [3]  # epoch 2's resumable checkpoint pruned to n_saved = 1

    again = _run(tmp_path, [1.0], max_epochs=4, resume=True, with_best=True)
    assert again.state.best_metric_epoch == 4 and _saved_weight(tmp_path) == pytest.approx(1.0)
    assert _epochs(tmp_path) == [4]


def test_without_the_best_metric_the_resume_overwrites(tmp_path):
    """The bug, reproduced: the validator starts from best_metric_epoch = -1, so any value is a new best."""
    _run(tmp_path, [1.1], max_epochs=1, resume=False, with_best=False)
    _run(tmp_path, [3.0], max_epochs=2, resume=True, with_best=False)
    assert _saved_weight(tmp_path) == pytest.approx(3.0)


def test_old_checkpoint_without_best_metric_still_resumes(tmp_path):
    _run(tmp_path, [1.1], max_epochs=1, resume=False, with_best=False)
    with pytest.warns(UserWarning, match="best metric"):
        evaluator = _run(tmp_path, [1.0], max_epochs=2, resume=True, with_best=True)
    assert evaluator.state.epoch == 2  # continued at epoch 2 from the old file


def test_prune_keeps_the_newest(tmp_path):
    for n in (1, 2, 10, 3):
        torch.save({}, tmp_path / f"checkpoint_checkpoint_epoch={n}.pt")
    (tmp_path / "model.pt").write_bytes(b"x")
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint_checkpoint_epoch=1.pt", "checkpoint_checkpoint_epoch=2.pt"]
    assert _epochs(tmp_path) == [3, 10] and (tmp_path / "model.pt").exists()
    assert latest_checkpoint(tmp_path).endswith("epoch=10.pt")
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


@pytest.mark.parametrize("bundle", ["certified_seg", "nlcen_lung", "resdsn_c2f_pancreas", "unet3d_brats_distill",
                                    "unet_advaug"])
def test_every_bundle_saves_and_restores_the_best_metric(bundle):
    """Each train.json stores the validator's best metric in the resumable checkpoint, restores it, and
    prunes with the saver's own n_saved."""
    config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    expected = "$common.checkpoint.BestMetricState(@validate#evaluator)"
    assert config["train"]["checkpoint_saver"]["save_dict"]["validator"] == expected
    assert config["train"]["resume_dict"]["validator"] == expected
    resume = [r for r in config["run"] if "resume_from_latest" in r]
    assert len(resume) == 1 and "keep=@train#checkpoint_saver#n_saved" in resume[0]


def test_bundle_run_resume_keeps_the_better_model(tmp_path):
    """Through ``monai.bundle.run`` (what ``python -m monai.bundle run`` calls) on unet_advaug's train.json:
    2 epochs learn a square (validation IoU 1.0); the resumed epoch 3 trains on inverted labels (IoU 0),
    so models/model.pt must keep epoch 2's weights and only epoch 3's resumable checkpoint remain."""
    import hashlib

    import nibabel as nib
    import numpy as np
    from monai.bundle import run

    from common.data.datalist import write_datalist

    label = np.zeros((32, 32), np.uint8)
    label[8:24, 8:24] = 1
    for sub, data in (("imagesTr", (label * 300.0 - 80.0).astype(np.float32)), ("labelsTr", label)):
        (tmp_path / sub).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / sub / "c.nii.gz")
    entry = {"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz"}
    datalist = write_datalist(tmp_path / "datalist.json", {"training": [entry] * 8, "validation": [entry]})
    bundle = BUNDLES / "unet_advaug"
    models = tmp_path / "models"
    common = dict(config_file=str(bundle / "configs" / "train.json"), meta_file=str(bundle / "configs" / "metadata.json"),
                  bundle_root=str(bundle), datalist=str(datalist), ckpt_dir=str(models), output_dir=str(tmp_path / "eval"),
                  progress_bar=False, batch_size=1, learning_rate=0.01, **{"network_def#features": [8, 8, 16, 32, 64, 8]})
    run(max_epochs=2, **common)
    first = torch.load(models / "checkpoint_checkpoint_epoch=2.pt", weights_only=True)["validator"]
    assert first["best_metric"] > 0.9  # the square was learnt
    digest = hashlib.sha256((models / "model.pt").read_bytes()).hexdigest()

    invert = [{"_target_": "Lambdad", "keys": "label", "func": "$lambda y: 1 - y"}]
    run(max_epochs=3, resume=True, **{**common, "learning_rate": 0.05, "train#random_transforms": invert})
    history = (tmp_path / "eval" / "iou_history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history] == ["epoch", "1", "2", "3"]  # the resume kept epochs 1-2
    assert float(history[2].split(",")[1]) == pytest.approx(first["best_metric"])
    assert float(history[-1].split(",")[1]) < first["best_metric"]
    assert sorted(p.name for p in models.glob("checkpoint_*")) == ["checkpoint_checkpoint_epoch=3.pt"]
    assert torch.load(models / "checkpoint_checkpoint_epoch=3.pt", weights_only=True)["validator"] == first
    assert hashlib.sha256((models / "model.pt").read_bytes()).hexdigest() == digest
