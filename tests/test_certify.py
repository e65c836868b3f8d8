"""Randomized-smoothing certification (common/certify.py) against independent oracles."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest
from statsmodels.stats.multitest import multipletests

from common.certify import (
    ABSTAIN,
    CertifiedSegmentation,
    binomial_pvalues,
    bonferroni_reject,
    certified_metrics,
    certified_radius,
    certify,
    certify_counts,
    holm_reject,
)



def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _constant_forward(label_map: torch.Tensor, num_classes: int):
    """A base model that ignores its input: logits = 10·one_hot(label_map) for every draw."""

    def forward(z: torch.Tensor) -> torch.Tensor:
        one_hot = torch.nn.functional.one_hot(label_map, num_classes).movedim(-1, 0).float() * 10
        return one_hot.unsqueeze(0).expand(z.shape[0], *one_hot.shape)

    return forward


def _noise_threshold_forward(prob_one: torch.Tensor, sigma: float):
    """Base model on x = 0: pixel i is class 1 iff δ_i/σ < Φ⁻¹(p_i), so P(class 1) = p_i exactly."""
    z = torch.tensor(np.vectorize(NormalDist().inv_cdf)(prob_one.numpy()), dtype=torch.float32)

    def forward(noisy: torch.Tensor) -> torch.Tensor:
        margin = z - noisy[:, 0] / sigma
        return torch.stack([torch.zeros_like(margin), margin], dim=1)

    return forward


# ---- multiple testing and p-values -------------------------------------------------------------------


@pytest.mark.parametrize("method, ours", [("holm", holm_reject), ("bonferroni", bonferroni_reject)])
def test_corrections_match_statsmodels(method, ours):
    rng = np.random.default_rng(0)
    # A batch of 4 families of 50 p-values, mixing tiny and discrete (tied) values.
    tiny, tied = 10 ** rng.uniform(-8, -2, (4, 20)), rng.choice([0.001, 0.02, 0.3, 1.0], (4, 30))
    p = np.concatenate([tiny, tied], axis=1)
    for alpha in (0.001, 0.2):
        got = ours(p, alpha)
        want = np.stack([multipletests(row, alpha=alpha, method=method)[0] for row in p])
        np.testing.assert_array_equal(got, want)
        assert want.any() and not want.all()


def test_pvalues_equal_binomtest():
    n, tau = 40, 0.75
    k = np.arange(n + 1)
    want = np.array([binomtest(int(i), n, tau, alternative="greater").pvalue for i in k])
    np.testing.assert_allclose(binomial_pvalues(k, n, tau), want, rtol=1e-12, atol=0)
    got = binomial_pvalues(torch.tensor([[n, 0], [30, 31]]), n, tau)
    np.testing.assert_allclose(got, want[[[n, 0], [30, 31]]], rtol=1e-12)


@pytest.mark.parametrize("sigma, tau", [(0.25, 0.75), (0.5, 0.75), (1.0, 0.9), (0.3, 0.5)])
def test_radius_is_sigma_times_inverse_normal(sigma, tau):
    assert certified_radius(sigma, tau) == pytest.approx(sigma * NormalDist().inv_cdf(tau), rel=1e-12)
    cert = certify(_constant_forward(torch.zeros(4, 4, dtype=torch.long), 2), torch.zeros(1, 1, 4, 4), sigma,
                   n0=2, n=5, tau=tau, generator=_gen())
    assert cert.radius == pytest.approx(sigma * NormalDist().inv_cdf(tau), rel=1e-12)
    assert certified_radius(0.25, 0.75) == pytest.approx(0.17, abs=0.005)  # the paper's R for σ = 0.25


# ---- certify: decisions -------------------------------------------------------------------------------


def test_unanimous_pixels_certify_and_split_pixel_abstains():
    label_map = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1], [1, 0, 0, 2]])
    cert = certify(_constant_forward(label_map, 3), torch.rand(2, 1, 3, 4), 0.5, generator=_gen())
    assert isinstance(cert, CertifiedSegmentation)
    assert cert.labels.dtype == torch.int64 and cert.labels.shape == (2, 3, 4)
    assert torch.equal(cert.labels, label_map.expand(2, 3, 4))
    assert torch.all(cert.counts == 100)
    np.testing.assert_allclose(cert.pvalues.numpy(), 0.75**100, rtol=1e-9)
    assert torch.all(cert.abstained_fraction == 0)

    # Pixel (0, 0) is class 1 iff its noise is negative (p = 1/2); the other pixels are class 1 (p ≈ 1).
    prob = torch.full((3, 4), 1 - 1e-12, dtype=torch.float64)
    prob[0, 0] = 0.5
    cert = certify(_noise_threshold_forward(prob, 0.5), torch.zeros(3, 1, 3, 4), 0.5, generator=_gen(1))
    assert torch.all(cert.labels[:, 0, 0] == ABSTAIN)
    assert torch.all(cert.labels.flatten(1)[:, 1:] == 1)
    np.testing.assert_allclose(cert.abstained_fraction.numpy(), 1 / 12)


def test_certify_counts_matches_direct_oracle():
    rng = np.random.default_rng(3)
    counts = torch.from_numpy(rng.integers(60, 101, size=(3, 5, 7)))
    selected = torch.from_numpy(rng.integers(0, 4, size=(3, 5, 7)))
    for correction, method in (("holm", "holm"), ("bonferroni", "bonferroni")):
        labels, p = certify_counts(selected, counts, 100, alpha=0.01, tau=0.75, correction=correction)
        for b in range(3):
            pv = np.array([binomtest(int(k), 100, 0.75, alternative="greater").pvalue
                           for k in counts[b].flatten()])
            keep = multipletests(pv, alpha=0.01, method=method)[0].reshape(5, 7)
            want = np.where(keep, selected[b].numpy(), ABSTAIN)
            np.testing.assert_array_equal(labels[b].numpy(), want)
            np.testing.assert_allclose(p[b].numpy().ravel(), pv, rtol=1e-10)
    labels, _ = certify_counts(selected, counts, 100, alpha=0.01, tau=0.75, correction="none")
    raw = binom.sf(counts.numpy() - 1, 100, 0.75) <= 0.01
    np.testing.assert_array_equal(labels.numpy(), np.where(raw, selected.numpy(), ABSTAIN))


def test_holm_certifies_superset_of_bonferroni_on_same_draws():
    prob = torch.linspace(0.80, 0.99, 64).reshape(8, 8)
    f, x = _noise_threshold_forward(prob, 1.0), torch.zeros(4, 1, 8, 8)
    holm = certify(f, x, 1.0, alpha=0.05, correction="holm", batch_size=64, generator=_gen(5))
    bonf = certify(f, x, 1.0, alpha=0.05, correction="bonferroni", batch_size=64, generator=_gen(5))
    assert torch.equal(holm.counts, bonf.counts)
    assert torch.all(holm.labels[bonf.labels != ABSTAIN] != ABSTAIN)
    assert (holm.labels != ABSTAIN).sum() > (bonf.labels != ABSTAIN).sum()


# ---- statistical validity and power ----------------------------------------------------------------


def _false_certification_images(correction: str, runs: int, alpha: float, seed: int) -> int:
    """Images (out of ``runs``) holding any pixel certified with a class of true probability ≤ τ.

    Per image: 32 pixels with P(class 1) = 0.74 (both classes ≤ τ = 0.75, so any certificate is false)
    and 32 pixels with P(class 1) = 0.97 (class 1 may be certified, class 0 may not).
    """
    prob = torch.tensor([0.74] * 32 + [0.97] * 32).reshape(8, 8)
    sigma = 0.5
    cert = certify(_noise_threshold_forward(prob, sigma), torch.zeros(runs, 1, 8, 8), sigma, n0=10, n=100,
                   alpha=alpha, tau=0.75, correction=correction, batch_size=1024, generator=_gen(seed))
    certified = cert.labels != ABSTAIN
    prob_of_certified = torch.where(cert.labels == 1, prob, 1 - prob)  # true P of the certified class
    false = certified & (prob_of_certified <= 0.75)
    assert certified[:, prob > 0.9].float().mean() > 0.9  # the true majority class is certified: non-trivial
    return int(false.flatten(1).any(1).sum())


def test_family_wise_error_is_controlled_and_the_test_has_power():
    alpha, runs = 0.1, 300
    # Largest count of failing images that is still consistent with a rate ≤ α (one-sided, level 1e-3).
    bound = int(binom.ppf(1 - 1e-3, runs, alpha))
    holm = _false_certification_images("holm", runs, alpha, seed=11)
    bonf = _false_certification_images("bonferroni", runs, alpha, seed=12)
    none = _false_certification_images("none", runs, alpha, seed=13)
    assert holm <= bound and bonf <= bound
    # Without correction each of the 32 null pixels is falsely certified at rate ≈ 0.07, so nearly every
    # image fails: the same check would have caught an uncorrected implementation.
    assert none > bound
    assert none / runs > 0.5


def test_class_map_is_torch_argmax_including_ties():
    from common.certify import _class_map

    g = _gen(6)
    for num_classes in (2, 3, 300):
        logits = torch.randint(0, 3, (4, num_classes, 5, 6), generator=g).float()  # many exact ties
        assert torch.equal(_class_map(logits).long(), logits.argmax(1))
    counts = torch.randint(0, 4, (2, 3, 7), generator=g, dtype=torch.int32)
    assert torch.equal(_class_map(counts).long(), counts.argmax(1))


# ---- interface: reproducibility, batching, shapes, denoiser hook, validation ---------------------------


def test_same_generator_seed_gives_identical_result():
    prob = torch.full((6, 6), 0.8)
    f, x = _noise_threshold_forward(prob, 0.25), torch.zeros(3, 1, 6, 6)
    a = certify(f, x, 0.25, n0=5, n=40, alpha=0.1, batch_size=7, generator=_gen(42))
    b = certify(f, x, 0.25, n0=5, n=40, alpha=0.1, batch_size=7, generator=_gen(42))
    c = certify(f, x, 0.25, n0=5, n=40, alpha=0.1, batch_size=7, generator=_gen(43))
    for field in ("labels", "pvalues", "selected", "counts"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.counts, c.counts)


def test_batches_stack_several_images_and_draw_counts_are_exact():
    calls = []

    def forward(z):
        calls.append(z.shape[0])
        return torch.stack([z[:, 0], -z[:, 0]], 1)  # class 0 where the input is positive

    x = torch.stack([torch.full((1, 4, 4), 5.0), torch.full((1, 4, 4), -5.0), torch.full((1, 4, 4), 5.0)])
    cert = certify(forward, x, 0.1, n0=3, n=30, alpha=0.01, batch_size=8, generator=_gen())
    assert calls == [8, 1] + [8] * 11 + [2]  # 3·3 selection draws, then 3·30 estimation draws, 8 per call
    assert torch.equal(cert.labels[:, 0, 0], torch.tensor([0, 1, 0]))
    assert torch.all(cert.counts == 30) and cert.n == 30


def test_deep_supervision_output_3d_volume_and_denoiser_hook():
    label_map = torch.randint(0, 3, (3, 4, 5), generator=_gen(2))
    head = _constant_forward(label_map, 3)
    seen = []

    def denoiser(noisy, sigma):
        seen.append((noisy.shape, sigma, float(noisy.std())))
        return torch.zeros_like(noisy)

    cert = certify(lambda z: [head(z), torch.zeros(1)], torch.zeros(2, 1, 3, 4, 5), 0.3, n0=4, n=40,
                   alpha=0.01, batch_size=16, denoiser=denoiser, generator=_gen())
    assert cert.labels.shape == (2, 3, 4, 5) and torch.equal(cert.labels, label_map.expand(2, 3, 4, 5))
    assert sum(s[0][0] for s in seen) == 2 * (4 + 40) and all(s[1] == 0.3 for s in seen)
    assert abs(seen[0][2] - 0.3) < 0.1  # the denoiser receives x + N(0, σ²) copies


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sigma": 0.0}, "sigma"), ({"sigma": -1.0}, "sigma"), ({"sigma": float("nan")}, "sigma"),
        ({"n0": 0}, "n0"), ({"n": 0}, "n"), ({"n": 2.5}, "n"),
        ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"),
        ({"tau": 0.4}, "tau"), ({"tau": 1.0}, "tau"),
        ({"correction": "fdr"}, "correction"), ({"batch_size": 0}, "batch_size"),
        ({"x": torch.full((1, 1, 4, 4), float("nan"))}, "x"), ({"x": torch.zeros(4, 4)}, "x"),
        ({"forward": lambda z: torch.zeros(z.shape[0], 2, 3, 3)}, "forward"),
        ({"forward": lambda z: torch.zeros(z.shape[0], 1, 4, 4)}, "forward"),
        ({"x": torch.zeros(0, 1, 4, 4)}, "x"),
        ({"denoiser": lambda z, s: z[:, :, :2]}, "denoiser"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"forward": _constant_forward(torch.zeros(4, 4, dtype=torch.long), 2),
            "x": torch.zeros(1, 1, 4, 4), "sigma": 0.25, "n0": 2, "n": 5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name}"):
        certify(**args)


# ---- certified metrics ---------------------------------------------------------------------------------


def _cert_with_labels(labels: torch.Tensor) -> CertifiedSegmentation:
    zeros = torch.zeros_like(labels)
    return CertifiedSegmentation(labels=labels, radius=0.17, pvalues=zeros.double(),
                                 selected=labels.clamp(min=0), counts=zeros, n=100, sigma=0.25, alpha=0.001,
                                 tau=0.75, correction="holm")


def test_certified_dice_and_iou_ignore_or_penalise_abstentions():
    A = ABSTAIN
    pred = torch.tensor([[[1, 1, A, 0], [1, 0, A, 0]]])  # (1, 2, 4)
    truth = torch.tensor([[[1, 1, 1, 0], [0, 0, 1, 1]]])
    m = certified_metrics(_cert_with_labels(pred), truth[:, None], num_classes=2)
    # Ignoring the 2 abstained pixels (02, 12): class 1 pred {00, 01, 10}, truth {00, 01, 13};
    # class 0 pred {03, 11, 13}, truth {03, 10, 11}.
    assert m["dice_1"].item() == pytest.approx(2 * 2 / (3 + 3))
    assert m["iou_1"].item() == pytest.approx(2 / 4)
    assert m["dice_0"].item() == pytest.approx(2 * 2 / (3 + 3))
    assert m["iou_0"].item() == pytest.approx(2 / 4)
    # Strict: abstentions are wrong, so truth class 1 has 5 pixels (02, 12 missed), class 0 loses nothing.
    assert m["dice_strict_1"].item() == pytest.approx(2 * 2 / (3 + 5))
    assert m["iou_strict_1"].item() == pytest.approx(2 / 6)
    assert m["dice_strict_0"].item() == pytest.approx(2 * 2 / (3 + 3))
    assert m["dice_strict_mean"].item() == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["dice_mean"].item() == pytest.approx(2 / 3)
    assert m["abstained_fraction"].item() == pytest.approx(2 / 8)
    fg = certified_metrics(_cert_with_labels(pred), truth, num_classes=2, include_background=False)
    assert "dice_0" not in fg and fg["dice_1"].item() == pytest.approx(2 / 3)


def test_metrics_per_image_and_empty_class_scores_one():
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, ABSTAIN]]])
    truth = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    m = certified_metrics(_cert_with_labels(pred), truth, num_classes=2)
    assert m["dice_1"].shape == (2,) and m["dice_1"][0] == 1.0 and m["dice_1"][1] == 1.0
    assert m["iou_1"][1] == 1.0 and m["dice_strict_1"][1] == 1.0  # EMPTY_CLASS_RULE: absent from both -> 1
    assert m["dice_0"][1] == 1.0 and m["dice_strict_0"][1].item() == pytest.approx(2 * 3 / (3 + 4))
    torch.testing.assert_close(m["abstained_fraction"], torch.tensor([0.0, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="^y"):
        certified_metrics(_cert_with_labels(pred), truth[:, :1], num_classes=2)
    with pytest.raises(ValueError, match="^y"):
        certified_metrics(_cert_with_labels(pred), truth + 2, num_classes=2)
