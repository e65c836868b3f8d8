"""Deterministic synthetic phantoms standing in for the papers' datasets (tests, CI, the demo).

Four generators return ``(image, label)`` numpy arrays, channel first:

=========================  ===================  ==========================================  ==================
generator                  stands in for        image                                       label
=========================  ===================  ==========================================  ==================
``chest_xray_phantom``     JSRT / SCR           float32 (1, H, W) in [0, 1]                 int64 (H, W) 0-4
``skin_lesion_phantom``    ISBI 2016 / ISIC     float32 (3, H, W) RGB in [0, 1]             int64 (H, W) 0/1
``brain_mri_phantom``      BraTS                float32 (4, D, H, W) T1, T1Gd, T2, FLAIR    int64 {0, 1, 2, 4}
``abdomen_ct_phantom``     NIH Pancreas-CT      float32 (1, X, Y, Z) Hounsfield units       int64 0/1 (2)
=========================  ===================  ==========================================  ==================

Every random choice (position, size, shape, tissue contrast, noise level, bias field) is drawn from
``np.random.default_rng(seed)`` in a fixed order (the optional CT lesion from its own stream
``default_rng([seed, 1])``), so the same ``(size, seed)`` gives bit-identical arrays (checked across
BLAS thread counts) and different seeds give different anatomy. Shapes are deformed ellipses/ellipsoids whose
normalised radius is divided by ``1 + a * clip(f, -2, 2)`` with ``f`` a smooth unit-variance random
field; since ``a`` is bounded, each structure always contains a neighbourhood of its centre, which is
why every label is non-empty for every seed down to the minimum sizes (32 per axis in 2D, 24 in 3D).

:func:`write_phantom_dataset` writes an MSD-style folder (``imagesTr``, ``labelsTr``,
``datalist.json``) whose case ``i`` is generated with seed ``seed + i``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from common.data.chest_xray import check_chest_target, paint_chest_label
from common.data.datalist import split_cases, write_datalist
from common.io import atomic_path
from common.validation import check_positive_int

__all__ = [
    "MIN_SIZE_2D",
    "MIN_SIZE_3D",
    "PHANTOM_KINDS",
    "chest_xray_phantom",
    "skin_lesion_phantom",
    "brain_mri_phantom",
    "abdomen_ct_phantom",
    "write_phantom_dataset",
]

MIN_SIZE_2D = 32  # smallest side (pixels) on which the chest and skin anatomy can be drawn
MIN_SIZE_3D = 24  # smallest side (voxels) for the brain and abdomen phantoms


# --------------------------------------------------------------------------------------------- helpers
def _check_size(size: Any, ndim: int, minimum: int) -> tuple[int, ...]:
    """``size`` as a tuple of ``ndim`` ints >= ``minimum`` (a single int is used for every axis)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size),) * ndim
    try:
        dims = tuple(size)
    except TypeError:
        raise ValueError(f"size: expected {ndim} integers, got {size!r}") from None
    if len(dims) != ndim or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in dims):
        raise ValueError(f"size: expected {ndim} integers, got {size!r}")
    if min(dims) < minimum:
        dims = tuple(int(d) for d in dims)
        raise ValueError(f"size: every side must be >= {minimum} to draw the anatomy, got {dims}")
    return tuple(int(d) for d in dims)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    return int(seed)


def _axes(shape: Sequence[int]) -> list[np.ndarray]:
    """Open grid of normalised coordinates: axis ``a`` runs from -1 (first index) to 1 (last index)."""
    ndim = len(shape)
    return [np.linspace(-1.0, 1.0, n).reshape([-1 if i == a else 1 for i in range(ndim)])
            for a, n in enumerate(shape)]


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], n_ctrl: int) -> np.ndarray:
    """Smooth random field on ``shape`` with zero mean and unit variance at every point.

    Gaussian noise on an ``n_ctrl``-per-axis control grid, interpolated one axis at a time with
    Gaussian radial weights normalised to unit sum of squares (so the variance is exactly 1
    everywhere, no per-image rescaling); ``n_ctrl`` sets the number of bumps across the image. The
    separable form costs O(N * n_ctrl): written here rather than ``scipy.ndimage.zoom`` + blur,
    because a cubic zoom of a 96x96x64 volume alone exceeds the CT phantom's time budget. (Each
    output is one dot product over ``n_ctrl`` terms, which BLAS does not split across threads.)
    """
    field = rng.standard_normal((n_ctrl,) * len(shape))
    ctrl = np.linspace(-1.2, 1.2, n_ctrl)
    width = 0.8 * (ctrl[1] - ctrl[0])
    for axis, n in enumerate(shape):
        weights = np.exp(-0.5 * ((np.linspace(-1.0, 1.0, n)[:, None] - ctrl[None, :]) / width) ** 2)
        weights /= np.sqrt((weights**2).sum(axis=1, keepdims=True))
        field = np.moveaxis(np.moveaxis(field, axis, -1) @ weights.T, -1, axis)
    return np.ascontiguousarray(field)


def _deform(field: np.ndarray, amplitude: float) -> np.ndarray:
    """Radius scale ``1 + amplitude * clip(field, -2, 2)``; always within ``1 ± 2 amplitude``."""
    return 1.0 + amplitude * np.clip(field, -2.0, 2.0)


def _ellipse(u, v, centre: Sequence[float], semi: Sequence[float], angle: float = 0.0, power: float = 2.0):
    """Normalised radius of a rotated (super)ellipse in the (u, v) plane (< 1 inside); ``power`` > 2
    squares the corners."""
    du, dv = u - centre[0], v - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    pu, pv = cos * du + sin * dv, -sin * du + cos * dv
    if power == 2.0:
        return np.sqrt((pu / semi[0]) ** 2 + (pv / semi[1]) ** 2)
    return (np.abs(pu / semi[0]) ** power + np.abs(pv / semi[1]) ** power) ** (1.0 / power)


def _ellipsoid(axes: Sequence[np.ndarray], centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Normalised radius of an axis-aligned ellipsoid (< 1 inside)."""
    return np.sqrt(sum(((a - c) / s) ** 2 for a, c, s in zip(axes, centre, semi)))


def _segment_distance(r: np.ndarray, c: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Euclidean distance (normalised units) from every (r, c) to the segment p0-p1."""
    d = p1 - p0
    t = np.clip(((r - p0[0]) * d[0] + (c - p0[1]) * d[1]) / float(d @ d), 0.0, 1.0)
    return np.hypot(r - p0[0] - t * d[0], c - p0[1] - t * d[1])


# ------------------------------------------------------------------------------------------- 2D: chest
def chest_xray_phantom(
    size: Sequence[int] = (256, 256), seed: int = 0, target: str = "lungs"
) -> tuple[np.ndarray, np.ndarray]:
    """Postero-anterior chest radiograph like JSRT with SCR-style organ labels.

    Returns ``image`` float32 (1, H, W) in [0, 1] (air dark, soft tissue and bone bright) and
    ``label`` int64 (H, W): 0 background, 1 left lung, 2 right lung, 3 heart, 4 clavicles.
    Orientation is the radiological one: row 0 is the top (apex), and the patient's LEFT is on the
    image's RIGHT, so the left lung (1) and most of the heart lie in columns > W/2, the right lung
    (2) in columns < W/2. The structures overlap like the SCR masks (clavicles over the lung apices,
    heart over the medial lower lungs); ``target`` resolves the overlaps with the rule prepared JSRT
    uses (:func:`common.data.chest_xray.paint_chest_label`): "lungs" (default, NLCEN) keeps every lung
    pixel (codes 1 / 2 = the union of the lung shapes), "classes" (certification) puts clavicles >
    heart > lungs. The image does not depend on ``target``. It has rib-like bands over the lungs, a
    spine shadow, a smooth multiplicative bias field, a seed-dependent gamma and Gaussian noise.
    """
    check_chest_target(target)
    h, w = _check_size(size, 2, MIN_SIZE_2D)
    rng = np.random.default_rng(_check_seed(seed))
    r, c = _axes((h, w))
    px = 2.0 / (min(h, w) - 1)  # one pixel in normalised units along the shorter axis

    body_c = rng.normal(0.0, 0.02)
    body = _ellipse(r, c, (0.15, body_c), (1.25, rng.uniform(0.82, 0.94))) < 1.0
    lung_deform = _smooth_field(rng, (h, w), 5)
    masks: dict[str, np.ndarray] = {}
    lungs = np.zeros((h, w), bool)
    for name, side in (("left lung", 1.0), ("right lung", -1.0)):  # side +1: image right = patient's left
        centre = (rng.uniform(-0.12, -0.02), side * rng.uniform(0.38, 0.48))
        semi = (rng.uniform(0.56, 0.66), rng.uniform(0.22, 0.30))
        angle, power = side * rng.uniform(0.0, 0.15), rng.uniform(2.2, 3.2)
        level = _ellipse(r, c, centre, semi, angle, power) / _deform(lung_deform, 0.08)
        lung = (level < 1.0) & (side * (c - body_c) > 0.06)
        masks[name] = lung
        lungs |= lung
    heart_centre = (rng.uniform(0.25, 0.38), rng.uniform(0.06, 0.16))
    heart_semi = (rng.uniform(0.18, 0.24), rng.uniform(0.28, 0.34))
    heart_level = _ellipse(r, c, heart_centre, heart_semi, rng.uniform(-0.6, -0.3))
    heart_level = heart_level / _deform(_smooth_field(rng, (h, w), 4), 0.05)
    heart = heart_level < 1.0
    masks["heart"] = heart
    clavicles = np.zeros((h, w), bool)
    for name, side in (("left clavicle", 1.0), ("right clavicle", -1.0)):
        medial = np.array([rng.uniform(-0.66, -0.56), side * rng.uniform(0.05, 0.12)])
        lateral = np.array([medial[0] - rng.uniform(0.02, 0.14), side * rng.uniform(0.62, 0.78)])
        half_width = max(rng.uniform(0.035, 0.05), 1.2 * px)
        masks[name] = _segment_distance(r, c, medial, lateral) < half_width
        clavicles |= masks[name]
    label = paint_chest_label(masks, target).astype(np.int64)

    background, tissue, air = rng.uniform(0.02, 0.08), rng.uniform(0.55, 0.70), rng.uniform(0.12, 0.25)
    image = np.where(body, tissue, background)
    image = image + 0.1 * (body & (np.abs(c - body_c) < rng.uniform(0.07, 0.10)))  # spine shadow
    vessels = 0.04 * _smooth_field(rng, (h, w), 12)
    image = np.where(lungs & ~heart, air + vessels, image)
    image = np.where(heart, tissue * rng.uniform(0.92, 1.05), image)
    rib_curve = r - rng.uniform(0.2, 0.4) * c**2  # posterior ribs sag laterally
    rib_phase = 2.0 * np.pi * rib_curve / rng.uniform(0.16, 0.22) + rng.uniform(0, 2 * np.pi)
    ribs = np.clip((np.sin(rib_phase) - 0.4) * 2.5, 0.0, 1.0) * (np.abs(c - body_c) < 0.85)
    image = image + rng.uniform(0.05, 0.10) * ribs * np.where(lungs, 1.0, 0.4) * body
    image = image + rng.uniform(0.12, 0.22) * clavicles
    image = ndimage.gaussian_filter(image, 0.7)
    image = image * np.exp(0.12 * _smooth_field(rng, (h, w), 3))
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.85, 1.15)
    image = image + rng.uniform(0.01, 0.03) * rng.standard_normal((h, w))
    return np.clip(image, 0.0, 1.0).astype(np.float32)[None], label


# -------------------------------------------------------------------------------------------- 2D: skin
def skin_lesion_phantom(size: Sequence[int] = (256, 256), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dermoscopy image like ISBI 2016 / ISIC: a dark irregular lesion on skin.

    Returns ``image`` float32 (3, H, W) RGB in [0, 1] and ``label`` int64 (H, W), 1 inside the
    lesion. The skin tone, lesion colour and variegation, lesion border (a deformed rotated ellipse),
    0-5 hair strokes (drawn over the lesion without changing the label, as in real images),
    vignetting, illumination field and noise all depend on the seed. The lesion's colour fades
    across its border: the label boundary is where the lesion colour has 50 % weight.
    """
    h, w = _check_size(size, 2, MIN_SIZE_2D)
    rng = np.random.default_rng(_check_seed(seed))
    r, c = _axes((h, w))
    px = 2.0 / (min(h, w) - 1)

    red = rng.uniform(0.72, 0.92)
    skin = np.array([red, red * rng.uniform(0.70, 0.85), 0.0])
    skin[2] = skin[1] * rng.uniform(0.80, 0.92)
    image = skin[:, None, None] * (1.0 + 0.04 * _smooth_field(rng, (h, w), 12))[None]

    centre = rng.uniform(-0.2, 0.2, 2)
    semi = rng.uniform(0.22, 0.45, 2)
    border = _deform(_smooth_field(rng, (h, w), 7), 0.1)
    border = border + 0.04 * np.clip(_smooth_field(rng, (h, w), 16), -2.0, 2.0)  # fine notches
    level = _ellipse(r, c, centre, semi, rng.uniform(0.0, np.pi)) / border  # radius scale in [0.72, 1.28]
    label = (level < 1.0).astype(np.int64)
    brown = np.array([rng.uniform(0.35, 0.55), rng.uniform(0.20, 0.35), rng.uniform(0.12, 0.25)])
    shade = (1.0 + 0.2 * _smooth_field(rng, (h, w), 6)) * (0.8 + 0.2 * np.minimum(level, 1.0))
    alpha = np.clip((1.0 - level) / 0.1 + 0.5, 0.0, 1.0)[None]
    image = image * (1.0 - alpha) + brown[:, None, None] * shade[None] * alpha

    hair_colour = rng.uniform(0.03, 0.15) * np.array([1.0, 0.8, 0.7])
    for _ in range(int(rng.integers(0, 6))):  # a handful of strokes, each drawn vectorised
        p, theta, bend = rng.uniform(-1.0, 1.0, 2), rng.uniform(0.0, np.pi), rng.uniform(-0.5, 0.5)
        width, length = max(rng.uniform(0.006, 0.012), 0.6 * px), rng.uniform(0.5, 1.5)
        along = (r - p[0]) * np.cos(theta) + (c - p[1]) * np.sin(theta)
        across = -(r - p[0]) * np.sin(theta) + (c - p[1]) * np.cos(theta) + bend * along**2
        stroke = 0.85 * np.clip(1.0 - np.abs(across) / width, 0.0, 1.0) * (np.abs(along) < length)
        image = image * (1.0 - stroke[None]) + hair_colour[:, None, None] * stroke[None]

    vignette = 1.0 - rng.uniform(0.10, 0.35) * (r**2 + c**2) / 2.0
    image = image * (vignette * np.exp(0.06 * _smooth_field(rng, (h, w), 3)))[None]
    image = image * rng.uniform(0.95, 1.05, 3)[:, None, None]
    image = image + rng.uniform(0.005, 0.02) * rng.standard_normal((3, h, w))
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


# ------------------------------------------------------------------------------------------- 3D: brain
# Tissue intensities (rows: T1, T1Gd, T2, FLAIR; columns: background, white matter, grey matter, CSF,
# oedema, enhancing rim, necrosis), the textbook ordering of each sequence before per-seed jitter.
_BRAIN_TABLE = np.array(
    [
        [0.0, 0.75, 0.55, 0.18, 0.45, 0.55, 0.25],
        [0.0, 0.75, 0.55, 0.18, 0.45, 0.95, 0.25],
        [0.0, 0.40, 0.55, 0.95, 0.80, 0.65, 0.90],
        [0.0, 0.45, 0.60, 0.12, 0.90, 0.75, 0.55],
    ]
)


def brain_mri_phantom(size: Sequence[int] = (48, 48, 48), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Skull-stripped multi-sequence brain MRI with a glioma, like BraTS.

    Returns ``image`` float32 (4, D, H, W) with channels (T1, T1Gd, T2, FLAIR) in [0, 1] (raw-MR-like
    intensities with the background exactly 0, as skull-stripped BraTS volumes; normalise them in
    the transform chain, e.g. ``NormalizeIntensityd(nonzero=True, channel_wise=True)``), and
    ``label`` int64 (D, H, W) in {0, 1, 2, 4}: 1 necrosis / non-enhancing core, 2 oedema, 4
    enhancing rim. Axes: 0 left-right (the midline fissure), 1 posterior-anterior (the brain's long
    axis), 2 inferior-superior, stored as NIfTI (x, y, z) by the writer: axial slices along the last.

    Nesting is exact by construction: the three regions are sub-level sets of one deformed radius
    ``g`` (g < t1 ⊂ g < t2 ⊂ g < 1), and in addition the core contains the 26-neighbour dilation of
    the necrosis and the whole tumour the dilation of the core, so every voxel next to a 1 is 1 or
    4 and every voxel next to a 1 or 4 is 1, 2 or 4. The tumour extends the brain mask where it
    reaches past it (mass effect), so every tumour voxel has brain intensities.
    """
    shape = _check_size(size, 3, MIN_SIZE_3D)
    rng = np.random.default_rng(_check_seed(seed))
    axes = _axes(shape)
    vox = 2.0 / (np.array(shape) - 1.0)  # one voxel in normalised units, per axis

    bc = rng.uniform(-0.03, 0.03, 3)
    bsemi = np.array([rng.uniform(0.66, 0.76), rng.uniform(0.78, 0.88), rng.uniform(0.66, 0.76)])
    brain_level = _ellipsoid(axes, bc, bsemi) / _deform(_smooth_field(rng, shape, 4), 0.04)
    brain = brain_level < 1.0
    cortex = 1.0 - rng.uniform(0.16, 0.24) * _deform(_smooth_field(rng, shape, 9), 0.35)
    tissue = np.where(brain, np.where(brain_level > cortex, 2, 1), 0)
    fissure = brain & (np.abs(axes[0] - bc[0]) < max(0.02, 0.6 * vox[0])) & (axes[2] > bc[2])
    csf = fissure
    for side in (-1.0, 1.0):
        centre = bc + [side * rng.uniform(0.07, 0.11), rng.uniform(-0.05, 0.05), rng.uniform(0.0, 0.1)]
        semi = [max(rng.uniform(0.05, 0.08), vox[0]), rng.uniform(0.2, 0.28), rng.uniform(0.08, 0.12)]
        csf = csf | (_ellipsoid(axes, centre, semi) < 1.0)
    tissue = np.where(csf & brain, 3, tissue)

    side = rng.choice([-1.0, 1.0])
    tc = bc + bsemi * [side * rng.uniform(0.15, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(-0.25, 0.3)]
    radius = rng.uniform(0.24, 0.34) * (min(shape) - 1) / 2.0 * rng.uniform(0.8, 1.2, 3)  # voxels per axis
    core_frac = rng.uniform(0.5, 0.7)
    necrosis_frac = core_frac * rng.uniform(0.45, 0.7)
    g = _ellipsoid([a / v for a, v in zip(axes, vox)], tc / vox, radius)  # in voxels: isotropic on any grid
    g = g / _deform(_smooth_field(rng, shape, 6), 0.15)
    ball = np.ones((3, 3, 3), bool)
    necrosis = g < necrosis_frac
    necrosis[tuple(np.round((tc + 1.0) / vox).astype(int))] = True
    core = (g < core_frac) | ndimage.binary_dilation(necrosis, ball)
    whole = (g < 1.0) | ndimage.binary_dilation(core, ball)
    label = np.zeros(shape, np.int64)
    label[whole], label[core], label[necrosis] = 2, 4, 1
    brain |= whole
    tissue = np.where(whole, np.where(core, np.where(necrosis, 6, 5), 4), tissue)

    table = _BRAIN_TABLE * rng.uniform(0.9, 1.1, _BRAIN_TABLE.shape) * rng.uniform(0.8, 1.0, (4, 1))
    image = table[:, tissue] * (1.0 + 0.05 * _smooth_field(rng, shape, 10))[None]
    image = ndimage.gaussian_filter(image, (0.0, 0.5, 0.5, 0.5))
    bias = np.stack([np.exp(0.1 * _smooth_field(rng, shape, 3)) for _ in range(4)])
    sigma = rng.uniform(0.01, 0.03)
    noise = sigma * rng.standard_normal((2, 4, *shape))
    image = np.hypot(image * bias + noise[0], noise[1]) * brain  # Rician magnitude noise
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


# ---------------------------------------------------------------------------------------- 3D: abdomen
def abdomen_ct_phantom(
    size: Sequence[int] = (96, 96, 64), seed: int = 0, lesion: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Abdominal CT like NIH Pancreas-CT, in Hounsfield units.

    Returns ``image`` float32 (1, X, Y, Z) holding whole HU values in [-1024, 3071] and ``label``
    int64 (X, Y, Z): 0 background, 1 pancreas, and with ``lesion=True`` 2 for a small hypodense liver
    lesion. Axes follow the NIfTI RAS+ affine the writer stores: X from the patient's left to right,
    Y posterior to anterior, Z inferior to superior (axial slices along the last axis). Tissues: air
    -1000, fat about -100, muscle and bowel 30-60, liver about 60 (on the patient's right, high X),
    spleen about 50, kidneys about 30, vertebra 180-300 with a 600-900 cortex and discs, and the
    pancreas an elongated lobulated tube, head at the liver side and tail towards the spleen, about
    40 HU with a finer texture than its neighbours. Seeds vary every geometry and contrast. The
    lesion draws come last from a separate stream, so ``lesion=True`` leaves the rest unchanged.
    """
    shape = _check_size(size, 3, MIN_SIZE_3D)
    seed = _check_seed(seed)
    if not isinstance(lesion, (bool, np.bool_)):
        raise ValueError(f"lesion: expected a bool, got {lesion!r}")
    rng = np.random.default_rng(seed)
    x, y, z = axes = _axes(shape)
    vox = 2.0 / (np.array(shape) - 1.0)
    hu = np.full(shape, -1000.0)
    owner = np.zeros(shape, np.int8)  # 1 where the liver is the visible (last painted) tissue

    def paint(mask: np.ndarray, value: Any, tag: int = 0) -> None:
        np.copyto(hu, value, where=mask)
        np.copyto(owner, tag, where=mask)

    bc = (rng.uniform(-0.03, 0.03), rng.uniform(-0.05, 0.03))
    bsemi = (rng.uniform(0.82, 0.92), rng.uniform(0.62, 0.72))
    body_level = _ellipse(x, y, bc, bsemi) / _deform(_smooth_field(rng, shape, 4), 0.03)
    fat_t, wall_t = rng.uniform(0.08, 0.16), rng.uniform(0.04, 0.07)
    paint(body_level < 1.0, rng.uniform(-110, -90))  # subcutaneous fat
    paint(body_level < 1.0 - fat_t, rng.uniform(40, 55))  # abdominal wall muscle
    interior = body_level < 1.0 - fat_t - wall_t
    paint(interior, rng.uniform(-100, -80))  # visceral fat
    bowel_field = _smooth_field(rng, shape, 7)
    bowel_thr = rng.uniform(0.3, 0.7)
    paint(interior & (bowel_field > bowel_thr), rng.uniform(25, 40))
    paint(interior & (bowel_field > bowel_thr + 1.3), rng.uniform(-950, -850))  # bowel gas

    organ_deform = _deform(_smooth_field(rng, shape, 5), 0.08)
    organ_texture = _smooth_field(rng, shape, 10)
    liver_c = (rng.uniform(0.35, 0.48), bc[1] + rng.uniform(0.0, 0.12), rng.uniform(0.25, 0.45))
    liver_s = (rng.uniform(0.33, 0.42), rng.uniform(0.35, 0.45), rng.uniform(0.55, 0.70))
    liver_hu = rng.uniform(52, 68)
    liver = interior & (_ellipsoid(axes, liver_c, liver_s) / organ_deform < 1.0)
    paint(liver, liver_hu + 4.0 * organ_texture, 1)
    spleen_c = (rng.uniform(-0.62, -0.5), bc[1] - rng.uniform(0.05, 0.2), rng.uniform(0.2, 0.45))
    spleen_s = (rng.uniform(0.12, 0.16), rng.uniform(0.18, 0.24), rng.uniform(0.25, 0.35))
    spleen = interior & (_ellipsoid(axes, spleen_c, spleen_s) / organ_deform < 1.0)
    paint(spleen, rng.uniform(45, 55) + 4.0 * organ_texture)

    spine_r = rng.uniform(0.10, 0.13)
    sc = (bc[0] + rng.uniform(-0.03, 0.03), bc[1] - bsemi[1] * rng.uniform(0.55, 0.65))
    muscle = _ellipse(x, y, (sc[0], sc[1] - 0.1), (0.25, 0.12)) < 1.0
    paint(muscle & (body_level < 1.0 - fat_t), rng.uniform(45, 60))  # paraspinal muscles
    for side in (-1.0, 1.0):
        centre = (sc[0] + side * rng.uniform(0.27, 0.34), sc[1] + rng.uniform(0.0, 0.08))
        centre = (*centre, rng.uniform(-0.35, -0.05))
        semi = (rng.uniform(0.09, 0.12), rng.uniform(0.12, 0.16), rng.uniform(0.22, 0.30))
        paint(_ellipsoid(axes, centre, semi) / organ_deform < 1.0, rng.uniform(25, 35) + 3.0 * organ_texture)
    vertebra = np.hypot(x - sc[0], y - sc[1])
    disc = np.sin(2.0 * np.pi * z / rng.uniform(0.35, 0.45) + rng.uniform(0, 2 * np.pi)) > 0.85
    cortex = vertebra > 0.75 * spine_r
    disc_hu, cortex_hu, cancellous_hu = rng.uniform(70, 90), rng.uniform(600, 900), rng.uniform(180, 300)
    paint(vertebra < spine_r, np.where(disc, disc_hu, np.where(cortex, cortex_hu, cancellous_hu)))
    process = (np.abs(x - sc[0]) < max(0.03, vox[0])) & (y < sc[1] - spine_r) & (y > sc[1] - 1.8 * spine_r)
    paint(process, rng.uniform(400, 600))  # spinous process
    for dx, dy, rad in (
        (-rng.uniform(0.06, 0.1), rng.uniform(0.06, 0.09), rng.uniform(0.045, 0.06)),  # aorta, patient's left
        (rng.uniform(0.1, 0.14), rng.uniform(0.05, 0.08), rng.uniform(0.04, 0.055)),  # inferior vena cava
    ):
        paint(np.hypot(x - sc[0] - dx, y - sc[1] - spine_r - dy) < rad, rng.uniform(35, 50))

    x_head, x_tail = rng.uniform(0.1, 0.2), rng.uniform(-0.48, -0.36)
    u = (x - (x_head + x_tail) / 2.0) / ((x_head - x_tail) / 2.0)  # +1 head (patient's right), -1 tail
    y_c = sc[1] + spine_r + rng.uniform(0.16, 0.22) + rng.uniform(0.03, 0.08) * (1.0 - u**2)
    z_c = rng.uniform(-0.2, 0.05) - rng.uniform(0.05, 0.15) * u  # the tail rises
    taper = 1.0 + 0.35 * np.clip(u, -1.0, 1.0)
    r_y = np.maximum(rng.uniform(0.065, 0.085) * taper, 1.5 * vox[1])  # at least 1.5 voxels
    r_z = np.maximum(rng.uniform(0.09, 0.13) * taper, 1.5 * vox[2])
    lobules = _deform(_smooth_field(rng, shape, 8), 0.2)
    pancreas = (((y - y_c) / r_y) ** 2 + ((z - z_c) / r_z) ** 2 + u**8) / lobules < 1.0
    paint(pancreas, rng.uniform(36, 48) + rng.uniform(4, 8) * _smooth_field(rng, shape, 16))

    bias = rng.uniform(0, 8) * _smooth_field(rng, shape, 3)
    noise = rng.uniform(8, 18) * rng.standard_normal(shape, dtype=np.float32)
    label = pancreas.astype(np.int64)
    if lesion:
        hu, label = _add_liver_lesion(np.random.default_rng([seed, 1]), hu, label, owner == 1, liver_hu)
    # partial-volume blur, weaker on small grids where the pancreas is only a few voxels thick
    hu = ndimage.gaussian_filter(hu.astype(np.float32), 0.4 * min(1.0, min(shape) / 64.0)) + bias + noise
    return np.clip(np.round(hu), -1024, 3071).astype(np.float32)[None], label


def _add_liver_lesion(
    rng: np.random.Generator, hu: np.ndarray, label: np.ndarray, liver: np.ndarray, liver_hu: float
) -> tuple[np.ndarray, np.ndarray]:
    """A hypodense spherical lesion (label 2) centred on a liver voxel at least its radius + 1.5 voxels
    deep (the deepest liver voxel if none is), so that liver surrounds it."""
    radius = max(1.5, rng.uniform(0.06, 0.12) * (min(hu.shape) - 1) / 2.0)  # voxels
    box = ndimage.find_objects(liver.astype(np.int8))[0]
    depth = ndimage.distance_transform_edt(np.pad(liver[box], 1))[1:-1, 1:-1, 1:-1]
    candidates = np.flatnonzero(depth > radius + 1.5)
    if candidates.size == 0:
        candidates = np.flatnonzero(depth == depth.max())
    centre = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], depth.shape))
    centre = centre + [s.start for s in box]
    grid = np.ogrid[tuple(slice(0, n) for n in hu.shape)]
    spot = (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2) & liver
    hu = np.where(spot, liver_hu - rng.uniform(30, 50), hu)
    return hu, np.where(spot, 2, label)


# ---------------------------------------------------------------------------------------------- writer
@dataclass(frozen=True)
class _Kind:
    generator: Callable[..., tuple[np.ndarray, np.ndarray]]
    ndim: int
    default_size: tuple[int, ...]
    labels: Mapping[str, str]
    modality: Mapping[str, str]
    options: tuple[str, ...] = ()


PHANTOM_KINDS: dict[str, _Kind] = {
    "chest": _Kind(
        chest_xray_phantom, 2, (256, 256),
        {"0": "background", "1": "left lung", "2": "right lung", "3": "heart", "4": "clavicles"},
        {"0": "X-ray"}, ("target",),
    ),
    "skin": _Kind(
        skin_lesion_phantom, 2, (256, 256), {"0": "background", "1": "lesion"},
        {"0": "dermoscopy red", "1": "dermoscopy green", "2": "dermoscopy blue"},
    ),
    "brain": _Kind(
        brain_mri_phantom, 3, (48, 48, 48),
        {"0": "background", "1": "necrotic and non-enhancing tumour core", "2": "peritumoral oedema",
         "4": "GD-enhancing tumour"},
        {"0": "T1", "1": "T1Gd", "2": "T2", "3": "FLAIR"},
    ),
    "abdomen": _Kind(
        abdomen_ct_phantom, 3, (96, 96, 64), {"0": "background", "1": "pancreas"}, {"0": "CT"}, ("lesion",)
    ),
}


_SECTIONS = ("training", "validation", "test")


def _spacing(kind: str, size: tuple[int, ...]) -> tuple[float, ...]:
    """Voxel size in mm: chest 360 mm and skin 20 mm fields of view, brain 1 mm, abdomen 0.8x0.8x1.5 mm."""
    if kind == "chest":
        return (360.0 / max(size),) * 2
    if kind == "skin":
        return (20.0 / max(size),) * 2
    return (1.0, 1.0, 1.0) if kind == "brain" else (0.8, 0.8, 1.5)


def _write_nifti(path: Path, data: np.ndarray, spacing: Sequence[float], vector: bool = False) -> None:
    """Gzipped NIfTI-1 with a diagonal RAS+ affine of ``spacing`` mm, written through ``atomic_path``
    (serialised in memory because nibabel picks the format from the temporary file's name)."""
    import nibabel as nib

    affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if vector:
        img.header.set_intent("vector")
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _write_png(path: Path, data: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(data).save(tmp, format="PNG")


def _write_case(
    kind: str, out_dir: Path, name: str, image: np.ndarray, label: np.ndarray, image_format: str, spacing
) -> str:
    """Write one case; returns the file suffix. Layouts (what MONAI's LoadImaged then returns):

    - NIfTI 2D grey: image (H, W) -> (1, H, W); label (H, W) uint8 -> (1, H, W).
    - NIfTI 2D RGB: image (H, W, 1, 1, 3) with the NIfTI "vector" intent (the standard encoding of a
      2D colour image): ``reader="ITKReader"`` loads it as (3, H, W); the default NibabelReader gives
      (3, H, W, 1, 1). Use ``image_format="png"`` for the default reader.
    - NIfTI 3D: channels in the last axis as MSD (brain (X, Y, Z, 4) float32, CT (X, Y, Z) int16
      HU) -> (C, X, Y, Z); label (X, Y, Z) uint8.
    - PNG (2D only): 8-bit grey or RGB, ``round(255 * image)``; MONAI's PILReader transposes to (C, W, H).
    """
    if image_format == "png":
        pixels = np.round(np.moveaxis(image, 0, -1) * 255.0).astype(np.uint8)
        _write_png(out_dir / "imagesTr" / f"{name}.png", pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        _write_png(out_dir / "labelsTr" / f"{name}.png", label.astype(np.uint8))
        return ".png"
    if kind == "abdomen":
        data = image[0].astype(np.int16)
    elif image.shape[0] == 1:
        data = image[0]
    elif kind == "skin":
        data = np.moveaxis(image, 0, -1)[:, :, None, None, :]
    else:
        data = np.moveaxis(image, 0, -1)
    _write_nifti(out_dir / "imagesTr" / f"{name}.nii.gz", data, spacing, vector=kind == "skin")
    _write_nifti(out_dir / "labelsTr" / f"{name}.nii.gz", label.astype(np.uint8), spacing)
    return ".nii.gz"


def write_phantom_dataset(
    kind: str,
    out_dir: str | os.PathLike,
    num_cases: int,
    size: Sequence[int],
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    image_format: str = "nifti",
    **kwargs: Any,
) -> Path:
    """Write ``num_cases`` phantoms of ``kind`` ("chest", "skin", "brain", "abdomen") as an MSD-style set.

    Files: ``out_dir/imagesTr/<kind>_<NNN>.nii.gz`` (or ``.png`` for 2D kinds with
    ``image_format="png"``) and ``out_dir/labelsTr/<kind>_<NNN>...`` (uint8), each written atomically;
    case ``i`` is generated with seed ``seed + i``. ``datalist.json`` holds the sections "training",
    "validation" and "test" (split by ``split_cases(..., fractions, seed=seed)``, paths relative to
    ``out_dir``) and the keys "labels", "modality", "numTraining" (size of the training section),
    "name", "tensorImageSize" and "seed". ``kwargs`` go to the generator (``lesion=True`` for
    "abdomen", which adds label 2; ``target="classes"`` for "chest", the certification overlap rule,
    default "lungs", stored as the datalist's "target"). Returns the datalist's path. Layouts: see
    ``_write_case``.
    """
    if not isinstance(kind, str) or kind not in PHANTOM_KINDS:
        raise ValueError(f"kind: expected one of {sorted(PHANTOM_KINDS)}, got {kind!r}")
    spec = PHANTOM_KINDS[kind]
    num_cases = check_positive_int(num_cases, "num_cases")
    size = _check_size(size, spec.ndim, MIN_SIZE_2D if spec.ndim == 2 else MIN_SIZE_3D)
    seed = _check_seed(seed)
    if image_format not in ("nifti", "png"):
        raise ValueError(f"image_format: expected 'nifti' or 'png', got {image_format!r}")
    if image_format == "png" and spec.ndim != 2:
        raise ValueError(f"image_format: 'png' is only for the 2D kinds (chest, skin), not {kind!r}")
    unknown = sorted(set(kwargs) - set(spec.options))
    if unknown:
        takes = list(spec.options) or "no extra arguments"
        raise ValueError(f"kwargs: the {kind} phantom takes {takes}, got {unknown}")
    split_cases(list(range(num_cases)), fractions, _SECTIONS, seed=seed)  # validates fractions before writing

    out_dir = Path(out_dir)
    spacing = _spacing(kind, size)
    entries = []
    for i in range(num_cases):
        image, label = spec.generator(size, seed + i, **kwargs)
        name = f"{kind}_{i:03d}"
        suffix = _write_case(kind, out_dir, name, image, label, image_format, spacing)
        entries.append({"image": f"imagesTr/{name}{suffix}", "label": f"labelsTr/{name}{suffix}"})
    sections = split_cases(entries, fractions, _SECTIONS, seed=seed)
    labels = dict(spec.labels)
    if kwargs.get("lesion"):
        labels["2"] = "liver lesion"
    extra = {"target": kwargs.get("target", "lungs")} if kind == "chest" else {}
    return write_datalist(
        out_dir / "datalist.json",
        sections,
        name=f"synthetic_{kind}",
        description=f"synthetic {kind} phantoms (common.data.synthetic); case i has seed {seed} + i",
        labels=labels,
        modality=dict(spec.modality),
        tensorImageSize=f"{spec.ndim + (len(spec.modality) > 1)}D",
        numTraining=len(sections["training"]),
        seed=seed,
        **extra,
    )
