"""MONAI Deploy end to end, run inside the SDK's own venv (``.venv-deploy``, ``scripts/deploy_env.py``) by
``tests/test_deploy.py``: export the certified_seg bundle, segment a phantom NIfTI with the Deploy
application of scripts/deploy_app.py, and compare with ``python -m monai.bundle run`` of the same bundle's
inference config on the same file; a checkpoint that is not weights-only and unreadable inputs are refused
with one error naming the file.

The file name does not start with ``test_``, so the main suite (whose venv has no SDK) does not collect
it; by hand: ``PYTHONPATH=. .venv-deploy/bin/python -m pytest -q tests/deploy_sdk_cases.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser, ckpt_export

from common.checkpoint import save_weights
from common.data.synthetic import write_phantom_dataset
from common.errors import InputError
from monai.deploy.core import Image
from monai.deploy.operators import MonaiBundleInferenceOperator
from scripts.deploy_app import label_map_from_image, segment, write_label_nifti
from tests.bundle_run import BUNDLES, REPO, run_bundle

NAME = "certified_seg"
BUNDLE = BUNDLES / NAME
CONFIGS = ["inference.json", "inference_demo.json"]  # the demo sizes: 32x32 input, UNet channels 8-16-32
CONFIG_NAMES = "inference,inference_demo"


def _nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 48x40 chest phantom (not the network's 32x32, so Resized and Invertd both act), seeded UNet
    weights saved as {"model": CPU state dict}, the TorchScript bundle from ckpt_export, and the
    reference segmentation of ``monai.bundle run`` with the same configs."""
    root = tmp_path_factory.mktemp("deploy")
    write_phantom_dataset("chest", root / "data", num_cases=3, size=(48, 40), seed=3)
    image = root / "data" / "imagesTr" / "chest_000.nii.gz"

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in CONFIGS])
    torch.manual_seed(0)
    weights = save_weights(parser.get_parsed_content("network_def"), root / "weights" / "model.pt")

    model_ts = root / "export" / "model.ts"
    model_ts.parent.mkdir()
    ckpt_export(
        net_id="network_def", filepath=str(model_ts), ckpt_file=str(weights), key_in_ckpt="model",
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        config_file=[str(BUNDLE / "configs" / c) for c in CONFIGS], bundle_root=str(BUNDLE),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # same thread count as the Deploy runs: bitwise-equal convolutions
        overrides = {"ckpt_dir": str(weights.parent), "output_dir": str(root / "reference")}
        run_bundle(NAME, CONFIGS, {**overrides, "datalist": [{"image": str(image)}]})
    return {"root": root, "image": image, "weights": weights, "model_ts": model_ts,
            "reference": root / "reference" / "chest_000_seg.nii.gz"}


def _declared_classes() -> set[int]:
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    return {int(k) for k in meta["network_data_format"]["outputs"]["pred"]["channel_def"]}


def _check_against_reference(seg_path: Path, exported: dict) -> None:
    seg, seg_affine = _nifti(seg_path)
    img, img_affine = _nifti(exported["image"])
    ref, _ = _nifti(exported["reference"])
    assert seg.dtype == np.uint8
    assert seg.shape == img.shape == (48, 40)
    np.testing.assert_allclose(seg_affine, img_affine, atol=1e-6)
    assert set(np.unique(seg).tolist()) <= _declared_classes()
    assert len(np.unique(ref)) >= 2  # the comparison is not between two constant maps
    np.testing.assert_array_equal(seg, ref)


def test_weights_layout_and_export(exported):
    """The checkpoint is {"model": state dict of CPU tensors}; model.ts embeds metadata and both configs."""
    ckpt = torch.load(exported["weights"], map_location="cpu", weights_only=True)
    assert list(ckpt) == ["model"]
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    with zipfile.ZipFile(exported["model_ts"]) as archive:
        extra = {Path(n).name for n in archive.namelist() if "/extra/" in n}
    assert extra == {"metadata.json", *CONFIGS}
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in CONFIGS])
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(ckpt["model"])
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scripted = torch.jit.load(str(exported["model_ts"])).eval()
        torch.testing.assert_close(scripted(x), eager.eval()(x), rtol=0, atol=1e-6)


def test_deploy_cli_torchscript_bundle_matches_bundle_run(exported):
    """``python -m scripts.deploy_app`` on the ckpt_export TorchScript file, as a user runs it."""
    out = exported["root"] / "deploy_ts"
    pythonpath = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    cmd = [sys.executable, "-m", "scripts.deploy_app", "--bundle", str(exported["model_ts"]),
           "--input", str(exported["image"]), "--output_dir", str(out), "--config_names", CONFIG_NAMES]
    proc = subprocess.run(cmd, cwd=exported["root"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    seg_path = out / "chest_000_seg.nii.gz"
    assert proc.stdout.strip().splitlines()[-1] == str(seg_path)
    assert sorted(p.name for p in out.iterdir()) == ["chest_000_seg.nii.gz"]  # no temporary left behind
    _check_against_reference(seg_path, exported)


def test_deploy_directory_bundle_pt_fallback(exported, tmp_path, monkeypatch):
    """A bundle directory with models/model.pt ({"model": state dict}): the SDK builds ``network`` from the
    config and loads the weights itself (its .pt fallback); same segmentation as the bundle run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a plain weights checkpoint loads all the same
    bundle = tmp_path / NAME
    (bundle / "configs").mkdir(parents=True)
    for name in ["metadata.json", *CONFIGS]:
        shutil.copy(BUNDLE / "configs" / name, bundle / "configs" / name)
    (bundle / "models").mkdir()
    shutil.copy(exported["weights"], bundle / "models" / "model.pt")
    seg_path = segment(bundle, exported["image"], tmp_path / "out", config_names=CONFIG_NAMES)
    assert seg_path == tmp_path / "out" / "chest_000_seg.nii.gz"
    _check_against_reference(seg_path, exported)
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME, "out"]  # nothing else written to the cwd


def test_segment_rejects_bad_arguments(exported, tmp_path):
    image, model_ts = exported["image"], exported["model_ts"]
    with pytest.raises(FileNotFoundError, match="bundle"):
        segment(tmp_path / "missing.ts", image, tmp_path)
    with pytest.raises(ValueError, match="bundle"):
        segment(exported["weights"], image, tmp_path)  # a plain checkpoint, not a TorchScript bundle
    with pytest.raises(ValueError, match="bundle.*train.json"):
        segment(model_ts, image, tmp_path, config_names="inference,train")  # not embedded by the export
    with pytest.raises(FileNotFoundError, match="input"):
        segment(model_ts, tmp_path / "missing.nii.gz", tmp_path, config_names=CONFIG_NAMES)
    with pytest.raises(ValueError, match="input"):
        segment(model_ts, exported["weights"], tmp_path, config_names=CONFIG_NAMES)
    with pytest.raises(ValueError, match="config_names"):
        segment(model_ts, image, tmp_path, config_names="../inference")
    (tmp_path / "b" / "configs").mkdir(parents=True)
    for name in ["metadata.json", "inference.json"]:
        shutil.copy(BUNDLE / "configs" / name, tmp_path / "b" / "configs" / name)
    with pytest.raises(FileNotFoundError, match="model.ts nor model.pt"):
        segment(tmp_path / "b", image, tmp_path)  # a bundle directory without weights
    assert not list(tmp_path.glob("*.nii.gz"))


def test_write_label_nifti_round_trip_and_checks(tmp_path):
    """uint8 labels and the affine come back from nibabel unchanged; bad labels / affines write nothing."""
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 5, size=(6, 5, 4))
    affine = np.array([[0.8, 0.0, 0.0, -10.0], [0.0, 0.8, 0.0, 4.0], [0.0, 0.0, 1.5, 2.5], [0, 0, 0, 1]])
    path = write_label_nifti(seg, affine, tmp_path / "seg.nii.gz")
    data, back = _nifti(path)
    assert data.dtype == np.uint8 and np.array_equal(data, seg)
    np.testing.assert_allclose(back, affine, atol=1e-6)
    with pytest.raises(ValueError, match="seg"):
        write_label_nifti(seg - 1, affine, tmp_path / "neg.nii.gz")
    with pytest.raises(ValueError, match="affine"):
        write_label_nifti(seg, np.full((4, 4), np.nan), tmp_path / "nan.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


def _sdk_output(pred: torch.Tensor, meta: dict) -> Image:
    """What MonaiBundleInferenceOperator emits for a (1, *spatial) prediction: its own ``_send_output``,
    called on a stand-in for the operator that holds only the output declaration."""
    sdk = MonaiBundleInferenceOperator
    op = SimpleNamespace(_outputs={"pred": {"type": "image"}}, known_io_data_types=sdk.known_io_data_types)
    op._get_io_data_type = lambda conf: sdk._get_io_data_type(op, conf)
    sent = {}
    port = SimpleNamespace(get=lambda name: None, emit=lambda value, name: sent.update({name: value}))
    sdk._send_output(op, pred, "pred", meta, port, None)
    return sent["pred"]


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 4)])
def test_label_map_from_image_inverts_the_sdk_layout(shape):
    """The SDK reverses a 3D map's axes (DICOM order) and keeps a 2D one; the writer gets the
    prediction back in the input's voxel order with the input file's affine, not the resized one."""
    pred = torch.from_numpy(np.random.default_rng(1).integers(0, 5, size=(1, *shape)))
    original = np.diag([0.8, 0.7, 1.5, 1.0])
    meta = {"original_affine": original, "affine": np.eye(4), "spatial_shape": np.array(shape)}
    image = _sdk_output(pred, meta)
    assert image.asnumpy().shape == (shape if len(shape) == 2 else shape[::-1])
    seg, affine = label_map_from_image(image)
    assert seg.shape == shape and np.array_equal(seg, pred[0].numpy())
    np.testing.assert_array_equal(affine, original)
    with pytest.raises(ValueError, match="pred.*Invertd"):
        label_map_from_image(_sdk_output(pred, {**meta, "spatial_shape": np.array(shape) + 1}))
    with pytest.raises(ValueError, match="pred.*original_affine"):
        label_map_from_image(_sdk_output(pred, {"spatial_shape": np.array(shape)}))
    with pytest.raises(ValueError, match="pred"):
        label_map_from_image(pred[0].numpy())


class _CodeInPickle:
    """Unpickling this object calls ``open(marker, "w")``: the side effect of a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bundle_dir(dest: Path) -> Path:
    (dest / "configs").mkdir(parents=True)
    for name in ["metadata.json", *CONFIGS]:
        shutil.copy(BUNDLE / "configs" / name, dest / "configs" / name)
    (dest / "models").mkdir()
    return dest


def test_checkpoint_with_code_is_refused_even_when_torch_is_told_to_run_it(exported, tmp_path, monkeypatch):
    """Under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 the SDK's plain ``torch.load`` would run a pickle's code;
    segment() refuses the file first (naming it), and the side effect never happens."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "side_effect"
    bundle = _bundle_dir(tmp_path / "bundle")
    weights = bundle / "models" / "model.pt"
    torch.save({"model": _CodeInPickle(marker)}, weights)
    # the oracle: with the variable set, a torch.load without weights_only (the SDK's call) runs the code
    torch.load(weights, map_location="cpu")
    assert marker.exists()
    marker.unlink()

    with pytest.raises(InputError, match=rf"bundle: {re.escape(str(weights))} is not a weights-only checkpoint"):
        segment(bundle, exported["image"], tmp_path / "out", config_names=CONFIG_NAMES)
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # the caller's environment is left as it was


def _bad_input(kind: str, good: Path, dest: Path) -> Path:
    data = good.read_bytes()
    path = dest / f"{kind}.nii.gz"
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not_an_image": b"patient notes\n" * 64}[kind])
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "not_an_image"])
def test_unreadable_input_is_refused_naming_the_file(exported, tmp_path, kind):
    bad = _bad_input(kind, exported["image"], tmp_path)
    with pytest.raises(InputError, match=re.escape(str(bad))):
        segment(exported["model_ts"], bad, tmp_path / "out", config_names=CONFIG_NAMES)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_truncated_input_on_one_line(exported, tmp_path):
    """The command line: exit status 2 and one ``error:`` line naming the file, no traceback."""
    bad = _bad_input("truncated", exported["image"], tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "scripts.deploy_app", "--bundle", str(exported["model_ts"]), "--input", str(bad),
           "--output_dir", str(tmp_path / "out"), "--config_names", CONFIG_NAMES]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and str(bad) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
