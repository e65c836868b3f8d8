"""Model-zoo conformance of every bundle: metadata fields, a standalone inference config, and
``verify_net_in_out`` through MONAI's own bundle command. A bundle added without them fails here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bundle_run import BUNDLES, REPO

ALL_BUNDLES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir())
REQUIRED_METADATA = (
    "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
    "task", "description", "authors", "copyright", "references", "network_data_format",
)
INFERENCE_KEYS = ("bundle_root", "device", "network_def", "preprocessing", "postprocessing", "inferer")


def test_every_paper_bundle_exists():
    assert {"nlcen_lung", "unet_advaug"} <= set(ALL_BUNDLES)


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_metadata_follows_the_model_zoo_schema(name):
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    assert not missing, f"{name}: metadata.json lacks {missing}"
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == "1.6.1" and meta["pytorch_version"].startswith("2.13")
    for section in ("inputs", "outputs"):
        for spec in meta["network_data_format"][section].values():
            assert {"spatial_shape", "value_range", "channel_def", "num_channels"} <= set(spec), (name, section)
            assert len(spec["channel_def"]) == spec["num_channels"], (name, section)
    assert (BUNDLES / name / "LICENSE").is_file() and (BUNDLES / name / "docs" / "README.md").is_file()


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_inference_config_stands_alone_with_monai_label_keys(name):
    config = json.loads((BUNDLES / name / "configs" / "inference.json").read_text())
    missing = [k for k in INFERENCE_KEYS if k not in config]
    assert not missing, f"{name}: inference.json lacks {missing}"


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_verify_net_in_out(name):
    bundle = BUNDLES / name
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
           "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--n", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr
