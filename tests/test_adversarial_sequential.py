"""AdversarialTrainingIteration(sequential=True): Liu et al., J. Digit. Imaging 2021 train "first with the
perturbed images and then with the clean images" per batch. Oracle: the same two SGD steps written out by
hand on a copy of the network (FGSM from the weights before the first step)."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.engines import SupervisedTrainer

from common.handlers import AdversarialTrainingIteration


class _FGSM:
    """Sign of the input gradient of the MSE, from ``net`` as it is when called."""

    def __init__(self, net: torch.nn.Module, eps: float) -> None:
        self.net, self.eps = net, eps

    def __call__(self, x, y):
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():  # the trainer crafts examples under eval_mode (no_grad), as common.attacks
            (grad,) = torch.autograd.grad(torch.nn.functional.mse_loss(self.net(x), y), x)
        return (x + self.eps * grad.sign()).detach()


def _run(net, x, y, sequential, beta=0.5, lr=0.1):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    it = AdversarialTrainingIteration(_FGSM(net, 0.3), beta=beta, sequential=sequential)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[{"image": x, "label": y}], network=net,
        optimizer=opt, loss_function=torch.nn.MSELoss(), iteration_update=it, decollate=False,
    )
    trainer.run()
    return trainer.state.output


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_sequential_is_an_adversarial_step_then_a_clean_step(beta):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 1, 3, padding=1)
    x, y = torch.rand(3, 2, 6, 6), torch.rand(3, 1, 6, 6)
    oracle = copy.deepcopy(net)
    out = _run(net, x, y, sequential=True, beta=beta)

    lr, mse = 0.1, torch.nn.functional.mse_loss
    x_adv = _FGSM(oracle, 0.3)(x, y)
    loss_adv = (1 - beta) * mse(oracle(x_adv), y)
    grads = torch.autograd.grad(loss_adv, list(oracle.parameters()))
    with torch.no_grad():
        for p, g in zip(oracle.parameters(), grads):
            p -= lr * g
    loss_clean = beta * mse(oracle(x), y)
    grads = torch.autograd.grad(loss_clean, list(oracle.parameters()))
    with torch.no_grad():
        for p, g in zip(oracle.parameters(), grads):
            p -= lr * g
    for a, b in zip(net.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert float(out["loss"]) == pytest.approx(float(loss_adv + loss_clean), rel=1e-6)

    # the default (one step on the weighted sum) lands elsewhere: the option changes the training
    torch.manual_seed(0)
    fresh = torch.nn.Conv2d(2, 1, 3, padding=1)
    _run(fresh, x, y, sequential=False, beta=beta)
    assert not torch.allclose(fresh.weight, net.weight)


def test_sequential_must_be_a_bool():
    with pytest.raises(ValueError, match="sequential"):
        AdversarialTrainingIteration(lambda x, y: x, sequential="yes")
