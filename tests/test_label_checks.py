"""Every bundle rejects, at load time and naming the file, a label map holding a value outside the classes it
declares (``common.transforms.CheckLabelsd`` in its preprocessing, before any label mapping, threshold or
resampling could hide the value).

Each case builds the bundle's own training dataset (``train#dataset``, a ``CacheDataset`` that loads every
item when it is built, i.e. exactly what ``python -m monai.bundle run`` does first in a training run) and the
dataset of its evaluate config (item 0 fetched) from a one-case datalist whose label holds a bad value;
``monai.bundle.ConfigParser`` resolves the same config ids the bundle run does, without a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from bundle_run import BUNDLES
from common.data.datalist import write_datalist

# bundle -> (label value outside the bundle's declared classes, image channels, spatial shape,
#            id of the evaluate config's dataset, extra overrides keeping the good-path shapes tiny)
CASES = {
    # chest labels 1..4 (SCR organs) mapped to lung / not lung; 7 is no organ
    "nlcen_lung": (7, 1, (8, 8), "validate#dataset", {"image_size": [8, 8]}),
    # BraTS {0, 1, 2, 4}, checked before the mapping to 0..3; 3 is no BraTS label
    "unet3d_brats_distill": (3, 4, (6, 6, 6), "evaluate#dataset", {"image_size": [6, 6, 6]}),
    # pancreas files hold 0..2 (MSD Task07: 2 = tumour); 3 would silently become pancreas under the threshold
    "resdsn_c2f_pancreas": (3, 1, (6, 6, 6), "evaluate#dataset", {}),
    # lesion slices are 0/1; 255 is a mask exported as 0/255
    "unet_advaug": (255, 1, (8, 8), "evaluate#dataset", {}),
    # chest classes 0..4 (background, left lung, right lung, heart, clavicles); 5 is none of them
    "certified_seg": (5, 1, (8, 8), "validate#dataset", {"image_size": [8, 8]}),
}


def _write_case(root: Path, bad_value: int, channels: int, shape: tuple[int, ...]) -> tuple[Path, Path]:
    """A one-case MSD-style dataset whose label is background except one voxel of ``bad_value``."""
    rng = np.random.default_rng(0)
    image = rng.random((*shape, channels) if channels > 1 else shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[(1,) * len(shape)] = bad_value
    label[(2,) * len(shape)] = 1
    for sub, data in (("imagesTr", image), ("labelsTr", label)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, np.eye(4)), root / sub / "case_000.nii.gz")
    entry = {"image": "imagesTr/case_000.nii.gz", "label": "labelsTr/case_000.nii.gz"}
    sections = {s: [entry] for s in ("training", "validation", "test")}
    datalist = write_datalist(root / "datalist.json", sections)
    return Path(datalist), root / "labelsTr" / "case_000.nii.gz"


def _parser(bundle: str, configs: list[str], datalist: Path, extra: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    parser["bundle_root"] = str(BUNDLES / bundle)
    parser["datalist"] = str(datalist)
    for key, value in extra.items():
        parser[key] = value
    return parser


def _chain(err: BaseException) -> list[BaseException]:
    """The exception and its causes (MONAI's ``Compose`` re-raises a transform's error as RuntimeError)."""
    out = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _assert_names_file(err: BaseException, label_file: Path, bad_value: int) -> None:
    value_errors = [e for e in _chain(err) if isinstance(e, ValueError)]
    assert value_errors, f"no ValueError in the chain of {err!r}"
    message = str(value_errors[-1])
    assert str(label_file) in message
    assert f"[{float(bad_value)}]" in message and "outside the declared classes" in message


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_bad_label_fails_training_dataset(bundle, tmp_path):
    bad, channels, shape, _, extra = CASES[bundle]
    datalist, label_file = _write_case(tmp_path, bad, channels, shape)
    parser = _parser(bundle, ["train.json"], datalist, extra)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train#dataset")
    _assert_names_file(info.value, label_file, bad)


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_bad_label_fails_evaluation_dataset(bundle, tmp_path):
    bad, channels, shape, dataset_id, extra = CASES[bundle]
    datalist, label_file = _write_case(tmp_path, bad, channels, shape)
    parser = _parser(bundle, ["train.json", "evaluate.json"], datalist, extra)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content(dataset_id)[0]
    _assert_names_file(info.value, label_file, bad)


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_declared_labels_pass(bundle, tmp_path):
    """The same case with every value inside the declared classes loads through the whole preprocessing."""
    _, channels, shape, _, extra = CASES[bundle]
    good = {"nlcen_lung": 2, "unet3d_brats_distill": 4, "resdsn_c2f_pancreas": 2,
            "unet_advaug": 1, "certified_seg": 4}[bundle]
    datalist, _ = _write_case(tmp_path, good, channels, shape)
    parser = _parser(bundle, ["train.json", "evaluate.json"], datalist, extra)
    item = parser.get_parsed_content(CASES[bundle][3])[0]
    label = np.asarray(item["label"])
    num_classes = parser.get_parsed_content("num_classes")
    assert label.min() >= 0 and label.max() < num_classes and label.max() > 0
