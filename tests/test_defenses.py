"""Defence objectives and the SupervisedTrainer iterations that wrap them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from common.attacks import FGSM, PGD
from common.defenses import adversarial_objective, teacher_soft_labels, uniform_noise
from common.handlers import AdversarialTrainingIteration, DistillationIteration, NoiseAugmentationIteration
from common.losses import DistillationDiceLoss, SoftDiceLoss, cross_entropy


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Dropout(0.3), nn.ReLU(), nn.Conv2d(4, 3, 1))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, 8, 8, generator=g)
    return x, torch.randint(0, 3, (2, 1, 8, 8), generator=g)


def test_eq9_objective_equals_weighted_clean_plus_fgsm_loss():
    model = net().eval()  # eval: no dropout, so the oracle sees the same function
    x, y = batch()
    loss_fn = SoftDiceLoss()
    attack = FGSM(model, 0.05, loss="dice")
    loss, pred, x_adv = adversarial_objective(model, loss_fn, x, y, attack, beta=0.5)
    x_fgsm = FGSM(model, 0.05, loss="dice")(x, y)
    torch.testing.assert_close(x_adv, x_fgsm)
    expected = 0.5 * loss_fn(model(x), y) + 0.5 * loss_fn(model(x_fgsm), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss0, pred0, _ = adversarial_objective(model, loss_fn, x, y, attack, beta=0.0)
    assert pred0 is None and loss0.item() == pytest.approx(loss_fn(model(x_fgsm), y).item(), rel=1e-6)
    with pytest.raises(ValueError, match="^beta"):
        adversarial_objective(model, loss_fn, x, y, attack, beta=1.5)


def test_adversarial_examples_are_crafted_in_eval_mode_and_mode_is_restored():
    model = net().train()
    x, y = batch()
    _, _, x_adv = adversarial_objective(model, cross_entropy, x, y, FGSM(model, 0.05), beta=0.5)
    assert model.training
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(x_adv, FGSM(model, 0.05)(x, y))  # dropout off: deterministic


def test_uniform_noise_radius():
    x = torch.zeros(2, 1, 16, 16)
    noisy = uniform_noise(x, 0.01, torch.Generator().manual_seed(0))
    assert noisy.abs().max() <= 0.01 and noisy.abs().max() > 0.009 and noisy.mean().abs() < 0.002
    with pytest.raises(ValueError, match="^radius"):
        uniform_noise(x, -1.0)


def _trainer(model, iteration, epochs=2):
    x, y = batch()
    data = [{"image": x, "label": y}] * 3
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=data,
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), 1e-2),
        loss_function=SoftDiceLoss(),
        iteration_update=iteration,
        decollate=False,
    )


@pytest.mark.parametrize(
    "make_iteration",
    [
        lambda m: AdversarialTrainingIteration(FGSM(m, 0.05, loss="dice"), beta=0.5),
        lambda m: AdversarialTrainingIteration(PGD(m, 0.05, alpha=0.02, steps=2), beta=0.0),
        lambda m: NoiseAugmentationIteration(radius=0.01, seed=0),
        lambda m: DistillationIteration(net(seed=5), temperature=20.0),
    ],
)
def test_iterations_train_through_supervised_trainer(make_iteration):
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    iteration = make_iteration(model)
    trainer = _trainer(model, iteration)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert trainer.state.epoch == 2 and len(losses) == 6
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    out = trainer.state.output
    assert out["pred"].shape == (2, 3, 8, 8) and set(out) >= {"image", "label", "pred", "loss"}
    if isinstance(iteration, DistillationIteration):
        assert all(not p.requires_grad for p in iteration.teacher.parameters())


def test_distillation_iteration_loss_is_eq7_against_teacher_soft_labels():
    teacher, student = net(seed=5).eval(), net(seed=1).eval()
    x, y = batch()
    iteration = DistillationIteration(teacher, temperature=20.0)
    loss, _ = iteration.objective(type("E", (), {"network": student})(), x, y)
    expected = DistillationDiceLoss(20.0)(student(x), teacher(x))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    soft = teacher_soft_labels(teacher, x, 20.0)
    torch.testing.assert_close(soft.sum(1), torch.ones(2, 8, 8))
