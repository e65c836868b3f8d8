"""PGD training with the ResDSN paper's budget per case (Li et al., 2019, Sec. 4.2: ε = 0.03 Λ = 10.2 HU,
α = 0.01 Λ, clipped to the [−100, 240] HU window): case statistics carried through patches and batches,
and adversarial patches whose perturbation, mapped back to HU with each patch's own case, is 10.2 HU and
stays inside the window — where the former mean-σ conversion gave 10.2 · σ_case / σ̄ HU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.transforms import Compose, NormalizeIntensityd, RandSpatialCropSamplesd

from common.ct_window import WindowPGD, ZNormWithStatsd
from common.handlers import AdversarialTrainingIteration

LAMBDA = 340.0  # HU width of the window


def _cases():
    """Two window-scaled cases (values in [0, 1]) with very different spreads, one touching both ends."""
    rng = np.random.default_rng(0)
    a = np.clip(rng.normal(0.5, 0.05, (1, 12, 12, 12)), 0, 1)
    b = rng.uniform(0, 1, (1, 12, 12, 12))
    b[0, 0, 0, :2] = (0.0, 1.0)
    labels = [(rng.uniform(size=(1, 12, 12, 12)) > 0.5).astype(np.int64) for _ in range(2)]
    return [{"image": torch.tensor(x, dtype=torch.float32), "label": torch.tensor(y)} for x, y in zip((a, b), labels)]


def test_znorm_with_stats_is_monai_and_survives_patches_and_batching():
    cases = _cases()
    for case in cases:
        out = ZNormWithStatsd("image")(dict(case))
        ref = NormalizeIntensityd("image")(dict(case))
        torch.testing.assert_close(torch.as_tensor(out["image"]), torch.as_tensor(ref["image"]))
        x = case["image"].double().numpy()
        assert float(out["image_window_mean"]) == pytest.approx(x.mean(), rel=1e-6)
        assert float(out["image_window_std"]) == pytest.approx(x.std(), rel=1e-5)  # population σ
    pipeline = Compose([ZNormWithStatsd("image"),
                        RandSpatialCropSamplesd(["image", "label"], (6, 6, 6), num_samples=3, random_size=False)])
    batch = next(iter(DataLoader(Dataset(cases, pipeline), batch_size=2, shuffle=False)))
    assert batch["image"].shape == (6, 1, 6, 6, 6) and batch["image_window_std"].shape == (6,)
    stds = [float(c["image"].double().std(unbiased=False)) for c in cases]
    np.testing.assert_allclose(batch["image_window_std"].numpy(), [stds[0]] * 3 + [stds[1]] * 3, rtol=1e-5)


def test_window_pgd_budget_is_10_2_hu_per_case_and_inside_the_window():
    cases = [ZNormWithStatsd("image")(c) for c in _cases()]
    z = torch.stack([torch.as_tensor(c["image"]) for c in cases])
    y = torch.stack([c["label"] for c in cases])
    batch = {k: torch.stack([torch.as_tensor(c[k]) for c in cases]) for k in ("image_window_mean", "image_window_std")}
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    attack = WindowPGD(net, eps=0.03, alpha=0.01, steps=5, generator=torch.Generator().manual_seed(0))
    z_adv = attack.for_batch(batch)(z, y)
    mean = batch["image_window_mean"].view(-1, 1, 1, 1, 1).float()
    std = batch["image_window_std"].view(-1, 1, 1, 1, 1).float()
    x, x_adv = z * std + mean, z_adv * std + mean
    delta_hu = (x_adv - x).abs().amax(dim=(1, 2, 3, 4)) * LAMBDA
    np.testing.assert_allclose(delta_hu.numpy(), [10.2, 10.2], rtol=1e-3)  # the budget, for either spread
    assert float(x_adv.min()) >= -1e-6 and float(x_adv.max()) <= 1 + 1e-6  # [-100, 240] HU
    # a mean-σ conversion (ε_z = 0.03 / σ̄) would have given each case 10.2 σ_case / σ̄ HU instead
    ratio = batch["image_window_std"] / batch["image_window_std"].mean()
    assert float((ratio - 1).abs().min()) > 0.3
    with pytest.raises(ValueError, match="image_window_mean"):
        attack.for_batch({"image": z})
    with pytest.raises(ValueError, match="for_batch"):
        attack(z, y)


def test_adversarial_training_iteration_asks_the_attack_for_each_batch():
    cases = _cases()
    seen = []

    class Spy(WindowPGD):
        def for_batch(self, batchdata, device="cpu"):
            seen.append(batchdata["image_window_std"].clone())
            return super().for_batch(batchdata, device)

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    loader = DataLoader(Dataset(cases, Compose([ZNormWithStatsd("image")])), batch_size=2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=loader, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0),
        iteration_update=AdversarialTrainingIteration(Spy(net, steps=2), beta=0.0), decollate=False,
    )
    trainer.run()
    stds = torch.tensor([float(c["image"].double().std(unbiased=False)) for c in cases])
    assert len(seen) == 2 and all(torch.allclose(s.float(), stds.float(), rtol=1e-5) for s in seen)
    assert np.isfinite(float(trainer.state.output["loss"]))
