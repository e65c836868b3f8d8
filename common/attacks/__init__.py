"""L∞ attacks on segmentation networks, 2D and 3D, on one :class:`Attack` base.

- classic (:mod:`common.attacks.classic`): FGSM, I-FGSM (BIM), PGD, targeted variants, inverse FGSM,
  Kurakin's schedule, the papers' ε unit conversions;
- :class:`APGD` (Croce & Hein, ICML 2020) with the SEA losses (Croce, Singh, Hein, ECCV 2024);
- :class:`SegPGD` (Gu et al., ECCV 2022) and :class:`CosPGD` (Agnihotri, Jung, Keuper, ICML 2024);
- :class:`WorstCase` / :func:`worst_case_attack`: the per-case worst case over an ensemble
  (:data:`DEFAULT_ENSEMBLE`), :func:`case_dice` its metric; :data:`ATTACKS` maps names to classes.

See :mod:`common.attacks.base` for the contract every attack keeps (validation, projection, clipping,
model mode and parameters untouched, detached output, per-sample ε, deep-supervision heads,
``forward.input_gradient``), and ``docs/threat_model.md`` for the threat model.
"""

from common.attacks.apgd import APGD, apgd_checkpoints
from common.attacks.base import Attack, PixelwiseAttack, output_from_postprocessing
from common.attacks.classic import (
    FGSM,
    IFGSM,
    PGD,
    InvFGSM,
    KurakinIFGSM,
    constant_target,
    eps_from_pixel_scale,
    inverted_target,
    kurakin_steps,
)
from common.attacks.segmentation import CosPGD, SegPGD, cospgd_weight, segpgd_lambda
from common.attacks.worst_case import ATTACKS, DEFAULT_ENSEMBLE, WorstCase, case_dice, select_attacks, worst_case_attack

__all__ = [
    "Attack",
    "PixelwiseAttack",
    "FGSM",
    "IFGSM",
    "PGD",
    "InvFGSM",
    "KurakinIFGSM",
    "APGD",
    "SegPGD",
    "CosPGD",
    "WorstCase",
    "worst_case_attack",
    "case_dice",
    "output_from_postprocessing",
    "select_attacks",
    "ATTACKS",
    "DEFAULT_ENSEMBLE",
    "apgd_checkpoints",
    "segpgd_lambda",
    "cospgd_weight",
    "inverted_target",
    "constant_target",
    "kurakin_steps",
    "eps_from_pixel_scale",
]
