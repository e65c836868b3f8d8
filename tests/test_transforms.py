"""CheckLabelsd: labels outside the declared classes fail at load time, naming the file."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, LoadImaged

from common.transforms import CheckLabelsd


def test_labels_inside_the_declared_classes_pass_unchanged():
    label = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.float32)
    out = CheckLabelsd("label", num_classes=2)({"label": label})
    assert out["label"] is label


@pytest.mark.parametrize("bad", [2.0, 255.0, -1.0, 0.5, float("nan")])
def test_labels_outside_the_declared_classes_name_the_file(tmp_path, bad):
    data = np.zeros((4, 4), np.float32)
    data[1, 1] = bad
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    pipeline = Compose([LoadImaged("label", ensure_channel_first=True), CheckLabelsd("label", num_classes=2)])
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps it; the cause is ours
        pipeline({"label": str(path)})
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    assert "mask.nii.gz" in str(cause) and "outside the declared classes [0, 1]" in str(cause)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="^num_classes"):
        CheckLabelsd("label", num_classes=0)


def test_declared_values_catch_a_raw_brats_label_3():
    """BraTS labels are {0, 1, 2, 4}: a 3 maps to nothing and would pass a 0..3 class check after mapping."""
    check = CheckLabelsd(keys="label", values=[0, 1, 2, 4])
    good = {"label": torch.tensor([[[0, 1], [2, 4]]])}
    assert check(good)["label"] is good["label"]
    with pytest.raises(ValueError, match=r"\[3\.0\] outside the declared classes \[0, 1, 2, 4\]"):
        check({"label": torch.tensor([[[0, 3], [2, 4]]])})
    for bad in ([], [0, 1.5], "0124", [True, 1]):
        with pytest.raises(ValueError, match="values"):
            CheckLabelsd(keys="label", values=bad)
