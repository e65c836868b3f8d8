"""Defences against adversarial attacks on segmentation networks.

- :mod:`common.defenses.training`: adversarial training objectives (Liu et al., J. Digit. Imaging 2021,
  Eq. 9; the ResDSN paper's PGD training), uniform-noise augmentation and the teacher's soft labels of
  defensive distillation; its names are re-exported here (``common.defenses.adversarial_objective``).
- :mod:`common.defenses.advaug`: adversarial data augmentation of Pervin et al., arXiv:2105.12106
  (FGSM / inverse-FGSM copies of the training set, offline files or an online refreshed dataset).

The ignite iterations and handlers that wire these into MONAI's ``SupervisedTrainer`` live in
:mod:`common.handlers`.
"""

from common.defenses import advaug  # noqa: F401  (common.defenses.advaug after ``import common.defenses``)
from common.defenses.training import (
    adversarial_examples,
    adversarial_objective,
    teacher_soft_labels,
    uniform_noise,
)

__all__ = ["adversarial_examples", "adversarial_objective", "uniform_noise", "teacher_soft_labels", "advaug"]
