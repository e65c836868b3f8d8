r"""Prepare NIH Pancreas-CT or MSD Task07_Pancreas for the ``resdsn_c2f_pancreas`` bundle: a datalist with
a seeded 4-fold cross-validation split (sections ``fold0`` … ``fold3``, every entry with its ``"fold"``),
native spacing kept (see ``common.data.pancreas``).

    python -m scripts.prepare_pancreas nih --images_root /data/Pancreas-CT \
        --labels_root /data/TCIA_pancreas_labels-02-05-2017 \
        --out_dir bundles/resdsn_c2f_pancreas/data/pancreas
    python -m scripts.prepare_pancreas msd --task_dir /data/Task07_Pancreas \
        --out_dir bundles/resdsn_c2f_pancreas/data/pancreas

Then train one fold with ``--fold k`` (see the bundle's docs/README.md). Prints the datalist's path.
"""

from __future__ import annotations

import fire

from common.data.pancreas import NUM_FOLDS, prepare_msd_pancreas, prepare_nih_pancreas


def nih(images_root: str, labels_root: str, out_dir: str, num_folds: int = NUM_FOLDS, seed: int = 0) -> str:
    """DICOM series under ``images_root/PANCREAS_NNNN/`` and ``labels_root/label00NN.nii.gz`` → NIfTI
    files and the datalist."""
    return str(prepare_nih_pancreas(images_root, labels_root, out_dir, num_folds, seed))


def msd(task_dir: str, out_dir: str | None = None, num_folds: int = NUM_FOLDS, seed: int = 0) -> str:
    """MSD Task07 ``dataset.json`` → datalist referring to the original files (labels > 0 = pancreas)."""
    return str(prepare_msd_pancreas(task_dir, out_dir, num_folds, seed))


if __name__ == "__main__":
    from scripts.cli import run

    run({"nih": nih, "msd": msd})
