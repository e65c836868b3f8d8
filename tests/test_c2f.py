"""Coarse-to-fine blocks of Li et al., 2019 (ResDSN C2F): crop / de-crop (Eq. 4–5), the overlap parameter n, the
small-component post-processing, the C2F pipeline and the HU preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from scipy import ndimage

from common.c2f import (
    CoarseToFine,
    CoarseToFineLogits,
    SlidingWindowForwardN,
    SlidingWindowN,
    bounding_box,
    coarse_to_fine_predict,
    crop_to_box,
    decrop,
    fine_input,
    hu_window_normalise,
    overlap_for_n,
    remove_small_components,
    windows_per_axis,
)
from common.networks.resdsn import ResDSN
from common.sliding_window import SlidingWindowForward


# --- bounding box, crop, de-crop (Eq. 4-5) ---------------------------------------------------------


def test_bounding_box_adds_margin_and_clips_to_the_volume():
    mask = np.zeros((10, 12, 8), dtype=np.uint8)
    mask[0, 5, 3] = 1  # touches the first face of axis 0
    mask[2, 7, 7] = 1  # touches the last face of axis 2
    assert bounding_box(mask, 2) == (slice(0, 5), slice(3, 10), slice(1, 8))
    assert bounding_box(torch.from_numpy(mask), (0, 6, 1)) == (slice(0, 3), slice(0, 12), slice(2, 8))
    assert bounding_box(mask, 0) == (slice(0, 3), slice(5, 8), slice(3, 8))
    assert bounding_box(np.zeros((4, 4, 4)), 3) is None
    with pytest.raises(ValueError, match="^margin"):
        bounding_box(mask, -1)
    with pytest.raises(ValueError, match="^margin"):
        bounding_box(mask, (1, 2))


def test_bounding_box_min_size_widens_short_axes_inside_the_volume():
    mask = np.zeros((10, 10, 6), dtype=np.uint8)
    mask[1:3, 8, 2:5] = 1  # axis 0: [1, 3), axis 1: [8, 9) at the far face, axis 2: [2, 5)
    # axis 0: 2 → 4, widened by 1 on each side; axis 1: 1 → 4, would end at 11, shifted back to [6, 10);
    # axis 2: 3 voxels, 8 wanted but the volume has 6 → the whole axis
    assert bounding_box(mask, 0, (4, 4, 8)) == (slice(0, 4), slice(6, 10), slice(0, 6))
    # an axis already as long as min_size is left as the margin made it
    assert bounding_box(mask, 1, 3) == (slice(0, 4), slice(7, 10), slice(1, 6))
    assert bounding_box(mask, 1, None) == bounding_box(mask, 1)
    with pytest.raises(ValueError, match="^min_size"):
        bounding_box(mask, 0, (4, 4))


def test_coarse_to_fine_min_size_gives_the_fine_model_a_window_sized_crop():
    x = torch.zeros(1, 1, 16, 16, 16)
    x[0, 0, 6:9, 7:8, 6:10] = 2.0  # a small organ: box 3 x 1 x 4
    calls: list = []
    pred = coarse_to_fine_predict(x, _threshold_forward(0.5), _threshold_forward(1.5, calls=calls), margin=1,
                                  min_size=8)
    assert calls[0].shape == (1, 1, 8, 8, 8)  # 5 x 3 x 6 with the margin, widened to the window
    assert torch.equal(calls[0], x[..., 4:12, 4:12, 4:12])  # each axis widened about the box
    expected = (x > 1.5).long()
    assert torch.equal(pred, expected)
    assert torch.equal(CoarseToFine(_threshold_forward(0.5), _threshold_forward(1.5), 1, min_size=8)(x), expected)
    logits = CoarseToFineLogits(_threshold_forward(0.5), _threshold_forward(1.5), 1, min_size=8)(x)
    assert torch.equal(logits.argmax(1, keepdim=True), expected)
    with pytest.raises(ValueError, match="^min_size"):
        CoarseToFine(_threshold_forward(0.5), _threshold_forward(1.5), 1, min_size=-8)


@pytest.mark.parametrize("as_torch", [False, True])
def test_crop_then_decrop_is_identity_in_the_box_and_keeps_the_rest(as_torch):
    rng = np.random.default_rng(0)
    coarse = np.zeros((2, 1, 12, 10, 9), dtype=np.int64)
    coarse[:, :, 3:9, 2:6, 1:5] = rng.random((2, 1, 6, 4, 4)) > 0.5
    coarse[:, :, 4, 3, 2] = 1
    fine = rng.integers(0, 3, size=coarse.shape)
    if as_torch:
        coarse, fine = torch.from_numpy(coarse), torch.from_numpy(fine)
    box = bounding_box(coarse[0, 0], 1)
    assert all(s.stop - s.start < n for s, n in zip(box, coarse.shape[2:]))  # a proper sub-box
    assert decrop(coarse, crop_to_box(coarse, box), box).tolist() == coarse.tolist()

    out = decrop(coarse, crop_to_box(fine, box), box)
    inside = np.zeros(coarse.shape, dtype=bool)
    inside[(Ellipsis, *box)] = True
    out_np, coarse_np, fine_np = (np.asarray(a) for a in (out, coarse, fine))
    assert (out_np[inside] == fine_np[inside]).all()
    assert (out_np[~inside] == coarse_np[~inside]).all()
    assert type(out) is type(coarse) and out is not coarse  # a new array, the coarse mask is untouched
    with pytest.raises(ValueError, match="^fine_pred_in_box"):
        decrop(coarse, fine[..., 1:], box)
    with pytest.raises(ValueError, match="^box"):
        crop_to_box(coarse, (slice(0, 13), slice(0, 2), slice(0, 2)))


def test_fine_input_is_the_masked_crop_of_eq4_or_the_raw_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 8, 7, generator=g)
    mask = torch.zeros(9, 8, 7, dtype=torch.long)
    mask[2:4, 3:5, 1:3] = 1
    mask[5, 5, 4] = 1
    x_f, box = fine_input(x, mask, margin=1)
    assert box == (slice(1, 7), slice(2, 7), slice(0, 6))
    assert torch.equal(x_f, (x * mask)[:, 1:7, 2:7, 0:6])
    x_raw, _ = fine_input(x, mask, margin=1, mask_input=False)
    assert torch.equal(x_raw, x[:, 1:7, 2:7, 0:6])
    assert fine_input(x, torch.zeros_like(mask), margin=1) == (None, None)


# --- the overlap parameter n ---------------------------------------------------------------------


def _monai_window_count(image_size, roi_size, overlap) -> int:
    """How many windows MONAI's sliding_window_inference actually feeds the predictor."""
    seen = []

    def predictor(window):
        seen.append(window.shape[0])
        return window

    sliding_window_inference(torch.zeros(1, 1, *image_size), roi_size, 64, predictor, overlap=overlap)
    return sum(seen)


# (W, W_I, n): the paper's CT sizes and fine boxes, including W not a multiple of W_I
EXACT = [(512, 64, 6), (512, 64, 12), (200, 64, 6), (150, 32, 6), (100, 64, 12), (333, 64, 12), (70, 64, 3)]


@pytest.mark.parametrize("W, W_I, n", EXACT)
def test_overlap_for_n_reproduces_the_papers_window_count(W, W_I, n):
    overlap = overlap_for_n(W, W_I, n)
    assert 0.0 <= overlap < 1.0
    got = _monai_window_count((W, 8, 8), (W_I, 8, 8), (overlap, 0.0, 0.0))
    assert got == W // W_I + n == windows_per_axis(W, W_I, n)


@pytest.mark.parametrize(
    "W, W_I, n, expected",
    [
        (64, 64, 12, 1),  # the window is the whole axis: one window, whatever n
        (40, 64, 6, 1),  # padded up to the window
        (130, 64, 0, 3),  # ⌊130/64⌋ + 0 = 2 windows cannot cover 130 voxels: the fewest that do
        (90, 64, 12, 14),  # 13 is not reachable with a uniform integer interval: the nearest count above
        (70, 64, 12, 7),  # capped at W - W_I + 1 windows (interval 1)
    ],
)
def test_overlap_for_n_when_the_count_is_not_reachable(W, W_I, n, expected):
    assert _monai_window_count((W, 8, 8), (W_I, 8, 8), (overlap_for_n(W, W_I, n), 0.0, 0.0)) == expected


def test_overlap_for_n_per_axis_with_monais_inferer():
    image, roi, n = (50, 37, 20), (16, 8, 16), 2
    overlap = overlap_for_n(image, roi, n)
    assert isinstance(overlap, tuple) and len(overlap) == 3
    expected = np.prod([w // r + n for w, r in zip(image, roi)])  # 5 * 6 * 3
    calls = []
    inferer = SlidingWindowInferer(roi, sw_batch_size=7, overlap=overlap)
    inferer(torch.zeros(1, 1, *image), lambda w: calls.append(w.shape[0]) or w)
    assert sum(calls) == expected == 90
    with pytest.raises(ValueError, match="^roi_size"):
        overlap_for_n((50, 37), (16, 8, 16), 2)


def test_sliding_window_n_recomputes_the_overlap_per_input_size():
    calls = []
    def ones(window):
        calls.append(window.shape[0])
        return torch.ones_like(window[:, :1])

    forward = SlidingWindowN(ones, (16, 16, 16), n=3, sw_batch_size=5)
    out = forward(torch.zeros(1, 1, 40, 24, 16))
    assert out.shape == (1, 1, 40, 24, 16) and torch.allclose(out, torch.ones_like(out))
    assert sum(calls) == (40 // 16 + 3) * (24 // 16 + 3) * 1
    calls.clear()
    forward(torch.zeros(1, 1, 70, 16, 16))
    assert sum(calls) == 70 // 16 + 3

    torch.manual_seed(0)
    net = ResDSN(channels=(2, 4, 4, 8)).eval()
    with torch.no_grad():
        logits = SlidingWindowN(net, (16, 16, 16), n=1)(torch.randn(1, 1, 20, 12, 17))
    assert logits.shape == (1, 2, 20, 12, 17)


# --- small-component removal ---------------------------------------------------------------------


def _components_volume() -> np.ndarray:
    """Components of 30, 10, 9 and 1 voxels (total 50, threshold 0.2 * 50 = 10), labels 1 and 2."""
    v = np.zeros((12, 12, 12), dtype=np.int64)
    v[0:2, 0:3, 0:5] = 1  # 30
    v[5, 0:2, 0:5] = 2  # 10: exactly 0.2 of the total, kept
    v[8:11, 8:11, 8] = 1  # 9: removed
    v[11, 0, 11] = 1  # 1: removed
    assert (v != 0).sum() == 50
    return v


def test_remove_small_components_keeps_exactly_those_at_least_the_fraction():
    v = _components_volume()
    out = remove_small_components(v, 0.2)
    expected = v.copy()
    expected[8:11, 8:11, 8] = 0
    expected[11, 0, 11] = 0
    assert out.dtype == v.dtype and (out == expected).all()
    # a fraction just above 10/50 also drops the 10-voxel component
    assert (remove_small_components(v, 0.2001) != 0).sum() == 30
    assert (remove_small_components(v, 0.0) == v).all()


def test_remove_small_components_connectivity_and_independent_volumes():
    v = np.zeros((2, 1, 6, 6, 6), dtype=np.uint8)
    v[0, 0, 0:2, 0:2, 0:2] = 1  # 8 voxels
    v[0, 0, 2, 2, 2] = 1  # touches the block at a corner only
    v[0, 0, 5, 5, 5] = 1
    v[1, 0, 0:2, 0, 0] = 1  # 2 voxels: the whole foreground of volume 1, kept
    # 26-connectivity: 9 of the 10 voxels of volume 0 form one component
    full = remove_small_components(torch.from_numpy(v), 0.2)
    assert isinstance(full, torch.Tensor) and full.dtype == torch.uint8
    assert full[0].sum() == 9 and full[0, 0, 5, 5, 5] == 0 and full[1].sum() == 2
    faces = remove_small_components(v, 0.2, connectivity=1)  # 6-connectivity: 8 | 1 | 1
    assert faces[0].sum() == 8 and faces[0, 0, 2, 2, 2] == 0 and faces[1].sum() == 2


def test_remove_small_components_matches_a_per_volume_oracle():
    rng = np.random.default_rng(1)
    masks = (rng.random((3, 1, 10, 9, 8)) > 0.8).astype(np.int32)
    got = remove_small_components(masks, 0.2)
    for b in range(3):
        labels, count = ndimage.label(masks[b, 0], structure=np.ones((3, 3, 3)))
        total = masks[b].sum()
        expected = np.zeros_like(masks[b, 0])
        for k in range(1, count + 1):
            size = (labels == k).sum()
            if 5 * size >= total:
                expected[labels == k] = 1
        assert (got[b, 0] == expected).all()


# --- the C2F pipeline ----------------------------------------------------------------------------


def _threshold_forward(low: float, high: float = np.inf, calls: list | None = None):
    """Toy ``x -> logits (B, 2, *spatial)``: class 1 where low < x < high."""

    def forward(x):
        if calls is not None:
            calls.append(x.clone())
        fg = ((x > low) & (x < high)).float()
        return torch.cat([1 - fg, fg], 1)

    return forward


def test_coarse_to_fine_on_a_toy_forward():
    x = torch.zeros(2, 1, 16, 16, 16)
    x[0, 0, 4:10, 5:9, 6:12] = 1.0  # coarse foreground: 144 voxels
    x[0, 0, 5:8, 6:8, 7:11] = 2.0  # fine foreground inside it
    x[0, 0, 15, 15, 0] = 1.0  # an isolated coarse false positive (1/145 < 0.2)
    x[0, 0, 4, 5, 13] = 5.0  # bright voxel inside the margin, outside the coarse mask
    x[1, 0, 0:3, 0:3, 0:3] = 7.0  # nothing in case 1 passes the coarse threshold below 4
    fine_calls: list = []
    coarse_forward, fine_forward = _threshold_forward(0.5, 4.0), _threshold_forward(1.5, calls=fine_calls)
    pred, coarse = coarse_to_fine_predict(x, coarse_forward, fine_forward, margin=2, return_coarse=True)
    expected = torch.zeros_like(x, dtype=torch.long)
    expected[0, 0, 5:8, 6:8, 7:11] = 1
    assert pred.dtype == torch.long and torch.equal(pred, expected)

    coarse_expected = torch.zeros_like(expected)
    coarse_expected[0, 0, 4:10, 5:9, 6:12] = 1  # the isolated voxel was removed before the box
    assert torch.equal(coarse, coarse_expected)
    assert len(fine_calls) == 1  # case 1 (empty coarse mask) falls back without a fine pass
    seen = fine_calls[0]
    assert seen.shape == (1, 1, 10, 8, 10)  # box of 4:10, 5:9, 6:12 plus 2, clipped at 16
    # X ⊗ P_C (Eq. 4): the 5.0 voxel inside the box but outside the coarse mask is zeroed
    assert torch.equal(seen, (x[:1] * coarse_expected[:1])[..., 2:12, 3:11, 4:14])

    raw = CoarseToFine(_threshold_forward(0.5, 4.0), _threshold_forward(1.5), margin=2, mask_input=False)(x)
    assert raw[0, 0, 4, 5, 13] == 0  # the unmasked bright voxel is fine foreground, then a small component
    assert torch.equal(raw, expected)


def test_coarse_to_fine_keeps_the_coarse_prediction_when_it_is_empty():
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    fine_calls: list = []
    fine_forward = _threshold_forward(-100.0, calls=fine_calls)
    pred = coarse_to_fine_predict(x, _threshold_forward(100.0), fine_forward, 3)
    assert torch.equal(pred, torch.zeros_like(pred)) and fine_calls == []


def test_coarse_to_fine_with_single_channel_logits_and_decrop_outside_the_box():
    x = torch.zeros(1, 1, 12, 12, 12)
    x[0, 0, 2:6, 2:6, 2:6] = 1.0
    fine = lambda t: torch.full_like(t, 3.0)  # every voxel of the box foreground (sigmoid logits > 0)
    pred = coarse_to_fine_predict(x, lambda t: t - 0.5, fine, margin=1, min_fraction=0.0)
    expected = torch.zeros_like(pred)
    expected[0, 0, 1:7, 1:7, 1:7] = 1
    assert torch.equal(pred, expected)
    with pytest.raises(ValueError, match="^fine_forward"):
        coarse_to_fine_predict(x, lambda t: t - 0.5, lambda t: t[..., :2], margin=1)


def test_coarse_to_fine_logits_argmax_is_the_c2f_prediction_and_gradients_come_from_the_right_stage():
    """Oracle: coarse logits = [0, a·x − 0.5], fine logits = [0, b·x − 1.5]; d(Σ fg logit)/dx is a outside
    the crop box and b inside it (mask_input False), or b·P_C inside it with the masked crop of Eq. 4."""
    x = torch.zeros(2, 1, 12, 12, 12, dtype=torch.float64)
    x[0, 0, 3:7, 4:8, 2:6] = 1.0  # coarse foreground (a = 1: logit 0.5 > 0)
    x[0, 0, 4:6, 5:7, 3:5] = 2.0  # fine foreground inside it (b = 1: logit 0.5 > 0)
    x[1] = 0.1  # case 1: empty coarse mask, keeps the coarse logits
    a, b = 1.0, 1.0

    def coarse(t):
        return torch.cat([torch.zeros_like(t), a * t - 0.5], 1)

    def fine(t):
        return torch.cat([torch.zeros_like(t), b * t - 1.5], 1)

    for mask_input in (False, True):
        target = CoarseToFineLogits(coarse, fine, margin=1, min_fraction=0.0, mask_input=mask_input)
        labels = coarse_to_fine_predict(x, coarse, fine, margin=1, min_fraction=0.0, mask_input=mask_input)
        xr = x.clone().requires_grad_(True)
        logits = target(xr)
        assert logits.shape == (2, 2, 12, 12, 12)
        assert torch.equal(logits.argmax(1, keepdim=True), labels)
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), [xr])
        expected = torch.full_like(x, a)
        box = (slice(2, 8), slice(3, 9), slice(1, 7))  # coarse box 3:7, 4:8, 2:6 plus 1
        coarse_mask = (x[0, 0] > 0.5).double()
        expected[0, 0][box] = b * coarse_mask[box] if mask_input else b
        torch.testing.assert_close(grad, expected)
    with pytest.raises(ValueError, match="^fine_forward"):
        CoarseToFineLogits(coarse, 3, margin=1)


# --- HU preprocessing ----------------------------------------------------------------------------


def test_hu_window_normalise_is_clip_then_per_case_z():
    rng = np.random.default_rng(2)
    hu = torch.from_numpy(rng.uniform(-1000, 1000, size=(2, 1, 6, 7, 5)).astype(np.float32))
    z, mean, std = hu_window_normalise(hu)
    clipped = np.clip(hu.double().numpy(), -100, 240)
    for b in range(2):
        assert abs(float(mean[b]) - clipped[b].mean()) < 1e-3
        assert abs(float(std[b]) - clipped[b].std()) < 1e-3
        oracle = (clipped[b] - clipped[b].mean()) / clipped[b].std()
        torch.testing.assert_close(z[b].double(), torch.from_numpy(oracle), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="^hu_range"):
        hu_window_normalise(hu, (240, -100))


class _OriginRecorder(torch.nn.Module):
    """Records each window's first voxel value (the input encodes the flat voxel index); 2 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 1))
        self.origins: list[int] = []

    def forward(self, x):
        self.origins += [int(round(float(v))) for v in x.detach()[:, 0, 0, 0, 0]]
        return self.w.view(1, 2, 1, 1, 1) * x


@pytest.mark.parametrize("size, roi, n", [((20, 18, 58), 8, 2), ((16, 16, 16), 8, 1), ((24, 16, 40), 8, 2)])
def test_attack_gradient_windows_are_the_coarse_test_windows(size, roi, n):
    """SlidingWindowForwardN scans, for its output and for the ResDSN window-mean gradient, exactly the
    windows SlidingWindowN (the coarse test) scans on the same case: ⌊W / W_I⌋ + n per axis (W ≥ W_I)."""
    x = torch.arange(int(np.prod(size)), dtype=torch.float64).view(1, 1, *size)
    y = torch.ones((1, 1, *size), dtype=torch.long)
    test_net, attack_net, grad_net = _OriginRecorder().double(), _OriginRecorder().double(), _OriginRecorder().double()
    SlidingWindowN(test_net, (roi,) * 3, n, sw_batch_size=1)(x)
    SlidingWindowForwardN(attack_net, (roi,) * 3, n, sw_batch_size=1)(x)
    forward = SlidingWindowForwardN(grad_net, (roi,) * 3, n, sw_batch_size=1, aggregation="window_mean")
    forward.input_gradient(x, y, lambda logits, labels: logits.sum())
    expected = int(np.prod([w // roi + n for w in size]))
    assert len(set(test_net.origins)) == expected
    assert set(attack_net.origins) == set(test_net.origins) == set(grad_net.origins)
    # the old fixed grid: the overlap of a (16, 16, 16) reference volume scans another set on this case
    fixed = _OriginRecorder().double()
    SlidingWindowForward(fixed, (roi,) * 3, overlap_for_n((16, 16, 16), (roi,) * 3, n), sw_batch_size=1)(x)
    assert (set(fixed.origins) == set(test_net.origins)) == (tuple(size) == (16, 16, 16))


def test_466_slice_axis_gets_13_windows_not_19():
    """The issue's case: W_I = 64, n = 6 along a 466-slice axis is ⌊466 / 64⌋ + 6 = 13 windows; the overlap
    of a 256-slice reference grid scans 19 (MONAI's window placement, counted without running a network)."""
    from common.sliding_window import window_slices

    own = window_slices((466,), (64,), overlap_for_n((466,), (64,), 6))
    ref = window_slices((466,), (64,), overlap_for_n((256,), (64,), 6))
    assert (len(own), len(ref)) == (13, 19)


@pytest.mark.parametrize("size, n", [((160, 160, 96), 1), ((160, 160, 96), 2), ((160, 160, 96), 12), ((88, 54, 57), 2)])
def test_bench_window_count_is_monais(size, n):
    """scripts/bench_c2f.py reports window counts; they must be the windows MONAI actually scans."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from scripts.bench_c2f import windows

    overlap = overlap_for_n(size, (64, 64, 64), n)
    padded = tuple(max(s, 64) for s in size)
    interval = _get_scan_interval(padded, (64, 64, 64), 3, overlap)
    assert windows(size, 64, n) == len(dense_patch_slices(padded, (64, 64, 64), interval))
    if n == 12 and size == (160, 160, 96):
        # the paper's ⌊W/64⌋ + 12 = 14, 14, 13 windows are not reachable with integer intervals on these
        # axes; overlap_for_n takes the nearest count above: intervals 7, 7, 2 → 15, 15, 17 windows
        assert windows(size, 64, n) == 15 * 15 * 17
