"""Load-time checks in every bundle (issue #16 items 5, 7, 8): an unreadable image file (truncated, empty,
not an image), NaN / Inf in an image, a label whose shape or affine differs from its image's, and an
empty datalist section each stop with one ``common.errors.InputError`` naming the file(s) — where the
bundle reads its data, before any training.

Datasets are built through ``monai.bundle.ConfigParser`` with the bundle's own config ids (what
``python -m monai.bundle run`` builds first); two runs go through ``python -m monai.bundle run`` itself
and check its stderr ends in that one line.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from bundle_run import BUNDLES, REPO
from common.data.datalist import load_datalist, write_datalist
from common.errors import InputError, find_input_error, one_line
from common.transforms import CheckImageLabeld, LoadImaged
from test_label_checks import CASES


def _write(root: Path, bundle: str, image_shape=None, label_shape=None, label_affine=None, nan=False) -> dict:
    """A one-case dataset in the bundle's layout (test_label_checks.CASES); returns the file paths."""
    _, channels, shape, _, _ = CASES[bundle]
    image_shape = tuple(image_shape or shape)
    label_shape = tuple(label_shape or image_shape)
    rng = np.random.default_rng(0)
    image = rng.random((*image_shape, channels) if channels > 1 else image_shape).astype(np.float32)
    if nan:
        image.flat[3] = np.nan
    label = np.zeros(label_shape, np.uint8)
    label[(1,) * len(label_shape)] = 1
    files = {"image": root / "imagesTr" / "case_000.nii.gz", "label": root / "labelsTr" / "case_000.nii.gz"}
    for key, data, affine in (("image", image, np.eye(4)), ("label", label, label_affine if label_affine is not None else np.eye(4))):
        files[key].parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), files[key])
    entry = {k: str(v.relative_to(root)) for k, v in files.items()}
    files["datalist"] = write_datalist(root / "datalist.json", {s: [entry] for s in ("training", "validation", "test")})
    return files


def _build(bundle: str, files: dict, config_id: str = "train#dataset", configs=("train.json",)):
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    parser["bundle_root"] = str(BUNDLES / bundle)
    parser["datalist"] = str(files["datalist"])
    for key, value in CASES[bundle][4].items():
        parser[key] = value
    out = parser.get_parsed_content(config_id)
    return out[0] if config_id != "train#dataset" else out


def _input_error(call) -> InputError:
    with pytest.raises(Exception) as info:
        call()
    err = find_input_error(info.value)
    assert err is not None, f"no InputError in the chain of {info.value!r}"
    assert one_line(info.value) == " ".join(str(err).split())  # what a bundle run prints
    return err


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a text file under an image name
        path.write_text("this is not an image\n")


@pytest.mark.parametrize("how", ["truncated", "empty", "text"])
@pytest.mark.parametrize("bundle", sorted(CASES))
def test_unreadable_image_names_the_file(bundle, how, tmp_path):
    files = _write(tmp_path, bundle)
    _corrupt(files["image"], how)
    err = _input_error(lambda: _build(bundle, files))
    assert str(files["image"]) in str(err)
    assert ("empty" if how == "empty" else "cannot be read as an image") in str(err)


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_label_shape_differs_names_both_files(bundle, tmp_path):
    """A 2-voxel-smaller label (the 32×32 mask of a 64×64 image) is refused by training and evaluation."""
    shape = CASES[bundle][2]
    files = _write(tmp_path, bundle, label_shape=tuple(s - 2 for s in shape))
    for config_id, configs in (("train#dataset", ("train.json",)), (CASES[bundle][3], ("train.json", "evaluate.json"))):
        err = str(_input_error(lambda: _build(bundle, files, config_id, configs)))
        assert str(files["label"]) in err and str(files["image"]) in err and "spatial shape" in err
        assert str(tuple(s - 2 for s in shape)) in err and str(tuple(shape)) in err


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_nan_in_image_names_the_file(bundle, tmp_path):
    files = _write(tmp_path, bundle, nan=True)
    err = str(_input_error(lambda: _build(bundle, files)))
    assert str(files["image"]) in err and "1 NaN/Inf" in err


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_inference_preprocessing_checks_the_image(bundle, tmp_path):
    """inference.json (the deploy / MONAI Label / card entry) loads with the same checks; no label needed."""
    files = _write(tmp_path, bundle, nan=True)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLES / bundle)
    preprocessing = parser.get_parsed_content("preprocessing")
    err = str(_input_error(lambda: preprocessing({"image": str(files["image"])})))
    assert str(files["image"]) in err and "NaN/Inf" in err
    good = _write(tmp_path / "good", bundle)
    assert preprocessing({"image": str(good["image"])})["image"].ndim >= 3


def test_affine_mismatch_names_both_files(tmp_path):
    """Same shape, a label 1 mm off in x: refused, with the largest difference (hand computed: 1.0)."""
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    files = _write(tmp_path, "resdsn_c2f_pancreas", label_affine=shifted)
    err = str(_input_error(lambda: _build("resdsn_c2f_pancreas", files)))
    assert str(files["label"]) in err and str(files["image"]) in err and "affines" in err and "1 >" in err
    # within tolerance (1e-4 mm): accepted
    shifted[0, 3] = 1e-4
    ok = _write(tmp_path / "ok", "resdsn_c2f_pancreas", label_affine=shifted)
    load = LoadImaged(["image", "label"], ensure_channel_first=True)
    item = CheckImageLabeld(["image", "label"])(load({"image": str(ok["image"]), "label": str(ok["label"])}))
    assert tuple(item["label"].shape[1:]) == CASES["resdsn_c2f_pancreas"][2]


def test_check_arguments_and_missing_label_key(tmp_path):
    with pytest.raises(ValueError, match="atol"):
        CheckImageLabeld(atol=-1)
    files = _write(tmp_path, "unet_advaug")
    load = LoadImaged("image", ensure_channel_first=True)
    assert CheckImageLabeld()(load({"image": str(files["image"])}))["image"].shape[0] == 1
    with pytest.raises(KeyError, match="image"):
        CheckImageLabeld(allow_missing_keys=False)({"label": 0})
    with pytest.raises(FileNotFoundError, match="nowhere.nii.gz"):
        load({"image": str(tmp_path / "nowhere.nii.gz")})


@pytest.mark.parametrize("section", ["training", "validation"])
def test_empty_section_refused_naming_datalist_and_section(section, tmp_path):
    files = _write(tmp_path, "unet_advaug")
    body = json.loads(Path(files["datalist"]).read_text())
    body[section] = []
    Path(files["datalist"]).write_text(json.dumps(body))
    with pytest.raises(InputError) as info:
        load_datalist(files["datalist"], section)
    assert str(info.value) == f"datalist {files['datalist']}: section '{section}' is empty"
    data_id = "train#data" if section == "training" else "validate#data"
    err = _input_error(lambda: _build("unet_advaug", files, data_id))
    assert f"section '{section}' is empty" in str(err)


def _bundle_run(bundle: str, files: dict, out: Path, extra: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLES / bundle / "configs" / "train.json"),
           "--meta_file", str(BUNDLES / bundle / "configs" / "metadata.json"), "--bundle_root", str(BUNDLES / bundle),
           "--datalist", str(files["datalist"]), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"),
           "--max_epochs", "1", "--progress_bar", "false"]
    for key, value in extra.items():
        cmd += [f"--{key}", json.dumps(value)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("ROBUST_SEG_DEBUG", None)
    return subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def test_bundle_run_empty_validation_stops_before_training_in_one_line(tmp_path):
    """Before the fix the run exited 0 without ever writing model.pt; now it stops before the first epoch."""
    files = _write(tmp_path, "unet_advaug")
    body = json.loads(Path(files["datalist"]).read_text())
    body["validation"] = []
    Path(files["datalist"]).write_text(json.dumps(body))
    proc = _bundle_run("unet_advaug", files, tmp_path, CASES["unet_advaug"][4])
    assert proc.returncode != 0
    assert _last_line(proc.stderr) == f"error: datalist {files['datalist']}: section 'validation' is empty"
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "models").glob("*.pt"))  # no epoch ran


def test_truncated_image_reported_in_one_line_by_the_bundle_hook(tmp_path, capsys, monkeypatch):
    """What ``python -m monai.bundle run`` prints for the uncaught error (its hook, called in-process):
    one line naming the file; with ROBUST_SEG_DEBUG=1 the usual traceback instead."""
    import common.errors

    files = _write(tmp_path, "unet_advaug")
    _corrupt(files["image"], "truncated")
    with pytest.raises(Exception) as info:
        _build("unet_advaug", files)
    assert type(info.value).__name__ == "RuntimeError"  # MONAI's "Failed to instantiate ..." wrapper
    seen = []
    monkeypatch.delenv(common.errors.DEBUG_ENV, raising=False)
    common.errors._hook(info.type, info.value, info.tb, previous=lambda *a: seen.append(a))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {files['image']}: cannot be read as an image (")
    assert not seen
    monkeypatch.setenv(common.errors.DEBUG_ENV, "1")
    common.errors._hook(info.type, info.value, info.tb, previous=lambda *a: seen.append(a))
    assert capsys.readouterr().err == "" and seen[0][1] is info.value  # handed to the default traceback
    monkeypatch.delenv(common.errors.DEBUG_ENV)
    common.errors._hook(KeyError, KeyError("x"), None, previous=lambda *a: seen.append(a))
    assert len(seen) == 2  # errors that are not bad input keep their traceback


def test_card_checks_any_bundles_label_grid(tmp_path):
    """The robustness card extends a zoo bundle's image preprocessing to the label; the check runs right
    after loading (before Spacingd could resample a mismatched label onto the image's grid)."""
    from common.card.label_transforms import extend_to_label
    from test_robustness_card import _zoo_config

    parser = ConfigParser(_zoo_config())
    config_path = tmp_path / "inference.json"
    extend_to_label(parser, config_path, lambda p, key, _path: p.get_parsed_content(key))
    preprocessing = parser.get_parsed_content("preprocessing")
    image, label = tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12), np.float32), np.eye(4)), image)
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 12), np.uint8), np.eye(4)), label)
    err = str(_input_error(lambda: preprocessing({"image": str(image), "label": str(label)})))
    assert str(label) in err and str(image) in err and "(10, 12, 12)" in err and "(12, 12, 12)" in err
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12), np.uint8), np.eye(4)), label)
    out = preprocessing({"image": str(image), "label": str(label)})
    assert tuple(out["label"].shape) == (1, 12, 12, 12)


def test_error_from_a_dataloader_worker_is_found(tmp_path):
    """torch re-raises a worker's error as text inside another exception; the one line still names the file."""
    from monai.data import DataLoader, Dataset

    files = _write(tmp_path, "unet_advaug")
    _corrupt(files["image"], "empty")
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "unet_advaug" / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLES / "unet_advaug")
    loader = DataLoader(Dataset([{"image": str(files["image"])}], parser.get_parsed_content("preprocessing")),
                        num_workers=1)
    with pytest.raises(Exception) as info:
        next(iter(loader))
    assert not isinstance(info.value, InputError)  # only text survives the process boundary
    assert one_line(info.value) == f"{files['image']}: the file is empty (0 bytes), not an image"


def test_cross_validation_training_part_empty_refused(tmp_path):
    """The pancreas bundle trains on every fold but the held-out one: a one-fold datalist has none."""
    from common.data.pancreas import load_fold

    files = _write(tmp_path, "resdsn_c2f_pancreas")
    entry = json.loads(Path(files["datalist"]).read_text())["training"][0]
    datalist = write_datalist(tmp_path / "folds.json", {"fold0": [entry]})
    with pytest.raises(InputError, match=f"datalist {datalist}: section 'training' of fold 0 is empty"):
        load_fold(datalist, "training", 0)
    assert len(load_fold(datalist, "validation", 0)) == 1
