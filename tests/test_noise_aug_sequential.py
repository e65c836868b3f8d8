"""NoiseAugmentationIteration(sequential=True): the BraTS paper's per-batch order (Liu et al., J. Digit.
Imaging 2021, "first ... the perturbed images and then ... the clean images") for the noise baseline, through
the same code path as adversarial training. Oracle: a linear model (1x1 convolution) and plain SGD, the two
steps written out by hand with the noise the handler draws (same seed)."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.engines import SupervisedTrainer

from common.defenses import uniform_noise
from common.handlers import AdversarialTrainingIteration, NoiseAugmentationIteration, _PerturbedIteration


class _CountingSGD(torch.optim.SGD):
    """SGD that records the parameters' values before each step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.before = []

    def step(self, closure=None):
        self.before.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _run(net, x, y, sequential, beta, lr=0.1, radius=0.2, seed=7):
    opt = _CountingSGD(net.parameters(), lr=lr)
    it = NoiseAugmentationIteration(radius=radius, beta=beta, seed=seed, sequential=sequential)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[{"image": x, "label": y}], network=net,
        optimizer=opt, loss_function=torch.nn.MSELoss(), iteration_update=it, decollate=False,
    )
    trainer.run()
    return trainer.state.output, opt


def _sgd(net, loss, lr):
    grads = torch.autograd.grad(loss, list(net.parameters()))
    with torch.no_grad():
        for p, g in zip(net.parameters(), grads):
            p -= lr * g


@pytest.mark.parametrize("beta", [0.5, 0.25])
def test_sequential_noise_is_a_noisy_step_then_a_clean_step(beta):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 1, 1)  # linear: y = w·x + b per pixel
    x, y = torch.rand(3, 2, 5, 5), torch.rand(3, 1, 5, 5)
    oracle = copy.deepcopy(net)
    out, opt = _run(net, x, y, sequential=True, beta=beta)
    assert len(opt.before) == 2  # two optimizer steps in one iteration

    lr, mse = 0.1, torch.nn.functional.mse_loss
    noisy = uniform_noise(x, 0.2, torch.Generator().manual_seed(7))  # the handler's draw (same seed)
    assert not torch.equal(noisy, x)
    loss_noisy = (1 - beta) * mse(oracle(noisy), y)
    _sgd(oracle, loss_noisy, lr)
    # the second step starts from the weights after the noisy step and sees the clean batch
    for a, b in zip(opt.before[1], oracle.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    loss_clean = beta * mse(oracle(x), y)
    _sgd(oracle, loss_clean, lr)
    for a, b in zip(net.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert float(torch.as_tensor(out["loss"]).detach()) == pytest.approx(float((loss_noisy + loss_clean).detach()), rel=1e-6)


def test_joint_noise_default_is_one_step_on_the_weighted_sum():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 1, 1)
    x, y = torch.rand(3, 2, 5, 5), torch.rand(3, 1, 5, 5)
    oracle = copy.deepcopy(net)
    _, opt = _run(net, x, y, sequential=False, beta=0.5)
    assert len(opt.before) == 1
    mse = torch.nn.functional.mse_loss
    noisy = uniform_noise(x, 0.2, torch.Generator().manual_seed(7))
    _sgd(oracle, 0.5 * mse(oracle(x), y) + 0.5 * mse(oracle(noisy), y), 0.1)
    for a, b in zip(net.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_noise_and_adversarial_share_the_sequential_path():
    assert issubclass(NoiseAugmentationIteration, _PerturbedIteration)
    assert issubclass(AdversarialTrainingIteration, _PerturbedIteration)
    assert NoiseAugmentationIteration.objective is AdversarialTrainingIteration.objective
    with pytest.raises(ValueError, match="sequential"):
        NoiseAugmentationIteration(sequential="yes")
