"""MONAI Label's bundle inference task (monailabel 0.8.5 ``BundleInferTask``) loads this project's bundles
from their directories and segments phantoms exactly as ``python -m monai.bundle run`` does.

MONAI Label runs in its own venv (``.venv-label``), which the first test builds from the pinned
``requirements-label.txt`` (minutes; reused while the file's hash matches the venv's stamp). One 2D
bundle (unet_advaug, a CT slice in HU) and one 3D bundle (unet3d_brats_distill, a 4-channel MRI) are
each copied with seeded untrained weights in ``models/model.pt``; the reference segmentation is the
same bundle's ``inference.json`` run by ``monai.bundle`` in the main venv on the same file.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_run import BUNDLES, REPO, run_bundle
from monai.bundle import ConfigParser

from common.checkpoint import save_weights
from common.data.datalist import write_datalist
from common.data.synthetic import abdomen_ct_phantom, brain_mri_phantom
from common.io import atomic_path
from scripts.monai_label_env import DEFAULT_REQUIREMENTS, STAMP_NAME, ensure_env, is_current, requirements_hash
from scripts.monai_label_infer import main as infer_main
from scripts.monai_label_infer import segment

INSTALL_TIMEOUT = 3000  # s: CI has 90 minutes; the build took 110-140 s here, wheels on local disk
# whichever test comes first builds the venv in its fixture setup, which pytest-timeout counts
pytestmark = [pytest.mark.slow, pytest.mark.timeout(INSTALL_TIMEOUT + 1800)]


@pytest.fixture(scope="module")
def label_python():
    """Interpreter of the MONAI Label venv, built on first use."""
    return ensure_env(timeout=INSTALL_TIMEOUT)


def _write_nifti(path, data: np.ndarray, spacing) -> None:
    affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), mtime=0))


def _ct_slice(path):
    """A 64×48 axial slice (HU, int16) through an abdominal CT phantom; returns its spatial shape."""
    image, _ = abdomen_ct_phantom((64, 48, 24), seed=1)
    _write_nifti(path, image[0, :, :, 12].astype(np.int16), (0.8, 0.8))
    return (64, 48)


def _brain(path):
    """A 32×28×24 four-channel MRI phantom stored MSD-style (X, Y, Z, 4); returns its spatial shape."""
    image, _ = brain_mri_phantom((32, 28, 24), seed=1)
    _write_nifti(path, np.moveaxis(image, 0, -1), (1.0, 1.0, 1.0))
    return (32, 28, 24)


CASES = {"unet_advaug": (_ct_slice, 2), "unet3d_brats_distill": (_brain, 3)}


def _bundle_with_weights(name: str, dest):
    """Copy bundle ``name``'s configs to ``dest`` and save seeded untrained weights of its ``network_def``
    as ``models/model.pt`` ({"model": state_dict}); returns the parsed inference config."""
    shutil.copytree(BUNDLES / name / "configs", dest / "configs")
    parser = ConfigParser()
    parser.read_config(str(dest / "configs" / "inference.json"))
    torch.manual_seed(0)
    save_weights(parser.get_parsed_content("network_def"), dest / "models" / "model.pt")
    return parser


def _declared_labels(parser: ConfigParser, metadata: dict) -> set[int]:
    """Label values the bundle declares: the output ``channel_def`` indices, mapped through the
    postprocessing's ``MapLabelValued`` where there is one (BraTS: 0, 1, 2, 3 -> 0, 1, 2, 4)."""
    channels = [int(k) for k in next(iter(metadata["network_data_format"]["outputs"].values()))["channel_def"]]
    for t in parser.config["postprocessing"]["transforms"]:
        if t["_target_"] == "MapLabelValued":
            mapping = dict(zip(t["orig_labels"], t["target_labels"]))
            channels = [mapping.get(c, c) for c in channels]
    return set(channels)


@pytest.fixture(scope="module")
def monai_label_runs(label_python, tmp_path_factory):
    """Both cases segmented by MONAI Label in one process (its imports and ITK's first load are paid
    once): name -> (work dir, parsed inference config, metadata, input spatial shape, facts printed)."""
    cases, argv = {}, []
    for name, (make_image, _) in sorted(CASES.items()):
        work = tmp_path_factory.mktemp(name)
        parser = _bundle_with_weights(name, work / "bundle")
        metadata = json.loads((work / "bundle" / "configs" / "metadata.json").read_text())
        spatial = make_image(work / "case.nii.gz")
        cases[name] = (work, parser, metadata, spatial)
        argv += ["--bundle_dir", str(work / "bundle"), "--image", str(work / "case.nii.gz"),
                 "--output", str(work / "monai_label_seg.nii.gz")]
    proc = subprocess.run(
        [str(label_python), str(REPO / "scripts" / "monai_label_infer.py"), *argv],
        cwd=tmp_path_factory.getbasetemp(), env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    facts = [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(cases):]]
    return {name: (*cases[name], f) for name, f in zip(sorted(cases), facts)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bundle_infer_task_matches_bundle_run(name, monai_label_runs):
    work, parser, metadata, spatial, facts = monai_label_runs[name]
    ndim = CASES[name][1]
    out = work / "monai_label_seg.nii.gz"
    assert facts["output"] == str(out)

    # dimension from metadata spatial_shape, labels from the output channel_def (background left out)
    inputs = next(iter(metadata["network_data_format"]["inputs"].values()))
    outputs = next(iter(metadata["network_data_format"]["outputs"].values()))
    assert facts["dimension"] == len(inputs["spatial_shape"]) == ndim
    assert facts["labels"] == {v.lower(): int(k) for k, v in outputs["channel_def"].items() if v.lower() != "background"}

    # the label file: the input's spatial shape (2D bundles squeeze the channel in their postprocessing:
    # MONAI Label's Restored squeezes only 4-D arrays), whole label values among the declared classes
    label = np.asarray(nib.load(out).dataobj)
    assert label.shape == spatial
    assert np.array_equal(label, np.round(label))
    values = set(np.unique(label).astype(int).tolist())
    assert values <= _declared_labels(parser, metadata)
    assert len(values) >= 2  # seeded untrained weights give a non-trivial map, so equality below means something

    # the reference: the same inference.json run by monai.bundle (main venv) on the same file
    write_datalist(work / "datalist.json", {"test": [{"image": "case.nii.gz"}]})
    overrides = {"datalist": str(work / "datalist.json"), "checkpoint": str(work / "bundle" / "models" / "model.pt"),
                 "output_dir": str(work / "reference")}
    run_bundle(name, ["inference.json"], overrides, cwd=work)
    (ref_file,) = (work / "reference").rglob("case_seg.nii.gz")
    reference = np.asarray(nib.load(ref_file).dataobj)
    assert reference.shape == spatial
    np.testing.assert_array_equal(label, reference)


def test_requirements_are_exact_pins():
    lines = [ln.strip() for ln in DEFAULT_REQUIREMENTS.read_text().splitlines()]
    pins = [ln for ln in lines if ln and not ln.startswith("#")]
    assert pins and all(ln.count("==") == 1 and not any(c in ln for c in "<>~;@ ") for ln in pins)
    names = {ln.split("==")[0].lower() for ln in pins}
    assert {"monailabel", "torch", "torchvision", "monai", "numpy"} <= names


def test_env_stamp_decides_reuse(tmp_path, label_python):
    """A venv is reused only while its stamp equals the requirements' hash; reuse costs no install."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(label_python)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("monailabel==0.8.5\n")
    assert not is_current(venv, requirements)
    (venv / STAMP_NAME).write_text(requirements_hash(requirements) + "\n")
    assert is_current(venv, requirements)
    start = time.perf_counter()
    assert ensure_env(venv, requirements) == venv / "bin" / "python"
    assert time.perf_counter() - start < 5.0
    requirements.write_text("monailabel==0.8.4\n")
    assert not is_current(venv, requirements)
    assert (label_python.parent.parent / STAMP_NAME).read_text().strip() == requirements_hash(DEFAULT_REQUIREMENTS)
    with pytest.raises(FileNotFoundError, match="requirements"):
        requirements_hash(tmp_path / "missing.txt")


def test_infer_script_names_missing_files(tmp_path):
    """Checked before MONAI Label is imported, so this runs in the main venv too."""
    shutil.copytree(BUNDLES / "unet_advaug" / "configs", tmp_path / "bundle" / "configs")
    image = tmp_path / "case.nii.gz"
    with pytest.raises(FileNotFoundError, match=r"bundle_dir: .*models/model\.pt"):
        segment(tmp_path / "bundle", image, tmp_path / "out.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"bundle_dir: .*configs/inference\.json"):
        segment(tmp_path / "missing", image, tmp_path / "out.nii.gz")
    with pytest.raises(ValueError, match="one of each per job"):
        infer_main(["--bundle_dir", "a", "--image", "b", "--output", "c", "--image", "d"])


class _CodeInPickle:
    """Unpickling this object calls ``open(marker, "w")``: the side effect of a crafted checkpoint."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_infer_refuses_a_checkpoint_with_code_even_when_torch_is_told_to_run_it(tmp_path, monkeypatch):
    """Under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 MONAI Label's plain ``torch.load`` would run a pickle's code;
    segment() loads ``models/model.pt`` with ``weights_only=True`` before MONAI Label is imported (so this
    runs in the main venv) and refuses it, naming the file; the side effect never happens."""
    from common.errors import InputError
    from common.safe_load import weights_only_loads

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    shutil.copytree(BUNDLES / "unet_advaug" / "configs", tmp_path / "bundle" / "configs")
    weights = tmp_path / "bundle" / "models" / "model.pt"
    weights.parent.mkdir()
    marker = tmp_path / "side_effect"
    torch.save({"model": _CodeInPickle(marker)}, weights)
    image = tmp_path / "case.nii.gz"
    _ct_slice(image)
    torch.load(weights, map_location="cpu")  # the oracle: a load without weights_only runs the code
    assert marker.exists()
    marker.unlink()
    with pytest.raises(InputError, match=r"bundle_dir: .*models/model\.pt is not a weights-only checkpoint"):
        segment(tmp_path / "bundle", image, tmp_path / "out.nii.gz")
    # the context the third-party loaders run in: a load without weights_only is refused as well
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(weights, map_location="cpu")
    assert not marker.exists() and not (tmp_path / "out.nii.gz").exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored after the block
