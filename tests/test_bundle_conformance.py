"""Model-zoo conformance of every bundle: metadata fields (meta_schema_20240725 plus the robustness results),
the zoo's files (LICENSE, docs/README.md with the template's sections, docs/data_license.txt,
large_files.yml), a standalone inference config, ``verify_net_in_out`` through MONAI's own bundle command with its
default arguments (n = 1: every ``spatial_shape`` is valid as declared), and ``ckpt_export`` to TorchScript by
``torch.jit.script`` (no ``--use_trace``: every network scripts) with the metadata and inference config embedded.
A bundle added without them fails here. ONNX export and ``torch.export`` are in ``test_bundle_onnx.py``."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import version

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export

from bundle_run import BUNDLES, REPO

ALL_BUNDLES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir())
REQUIRED_METADATA = (
    "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
    "task", "description", "authors", "copyright", "references", "network_data_format",
)
TENSOR_FIELDS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def")
INFERENCE_KEYS = ("bundle_root", "device", "network_def", "preprocessing", "postprocessing", "inferer")
README_SECTIONS = ("Model Overview", "Data", "Training configuration", "Performance", "MONAI Bundle Commands",
                   "References", "License")
# the input of the exported network's parity check: small shapes the network accepts, for speed
EXPORT_SHAPES = {
    "certified_seg": [1, 1, 64, 64],
    "nlcen_lung": [1, 1, 64, 64],
    "resdsn_c2f_pancreas": [1, 1, 32, 32, 32],
    "unet3d_brats_distill": [1, 4, 32, 32, 32],
    "unet_advaug": [1, 1, 32, 32],
}


def test_every_paper_bundle_exists():
    assert {"nlcen_lung", "unet_advaug"} <= set(ALL_BUNDLES)


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_metadata_follows_the_model_zoo_schema(name):
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    assert not missing, f"{name}: metadata.json lacks {missing}"
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == "1.6.1" and meta["pytorch_version"].startswith("2.13")
    pinned = {**meta["required_packages_version"], "numpy": meta["numpy_version"], "monai": meta["monai_version"],
              "torch": meta["pytorch_version"]}
    drift = {k: (v, version(k).split("+")[0]) for k, v in pinned.items() if version(k).split("+")[0] != v}
    assert not drift, f"{name}: metadata versions differ from the installed ones (metadata, installed): {drift}"
    for section in ("inputs", "outputs"):
        for spec in meta["network_data_format"][section].values():
            assert set(TENSOR_FIELDS) <= set(spec), (name, section, sorted(set(TENSOR_FIELDS) - set(spec)))
            assert len(spec["channel_def"]) == spec["num_channels"], (name, section)
    assert (BUNDLES / name / "LICENSE").is_file() and (BUNDLES / name / "docs" / "README.md").is_file()
    results = meta.get("robustness_results")
    assert isinstance(results, dict) and {"command", "data", "results"} <= set(results), name
    module, flags = study_command(results["command"])
    params = inspect.signature(importlib.import_module(module).main).parameters
    unknown = [f for f in flags if f not in params]
    assert not unknown, f"{name}: robustness_results.command passes {unknown}, which {module}.main does not take"
    bad = ragged_sweeps(results["results"])
    assert not bad, f"{name}: robustness_results series whose length differs from their eps / sigma axis: {bad}"


def study_command(command: str) -> tuple[str, list[str]]:
    """The module (``scripts.x``) and the ``--flags`` of ``python -m scripts.x ...`` /
    ``python scripts/x.py ...``; ``AssertionError`` for any other command."""
    words = shlex.split(command)
    assert words[:1] == ["python"] and len(words) >= 2, command
    if words[1] == "-m":
        module, rest = words[2], words[3:]
    else:
        assert words[1].endswith(".py"), command
        module, rest = words[1][: -len(".py")].replace("/", "."), words[2:]
    return module, [w[2:].split("=")[0] for w in rest if w.startswith("--")]


def ragged_sweeps(node, path: str = "") -> list[str]:
    """Paths of lists, inside a dict that holds an ``eps`` or ``sigma`` list (a sweep axis), whose length
    differs from the axis's (nested dicts of that sweep included)."""
    bad = []
    if isinstance(node, dict):
        axis = next((node[k] for k in ("eps", "sigma") if isinstance(node.get(k), list)), None)
        if axis is not None:
            stack = [(path, node)]
            while stack:
                where, item = stack.pop()
                for key, value in item.items():
                    if isinstance(value, list) and len(value) != len(axis):
                        bad.append(f"{where}/{key}")
                    elif isinstance(value, dict):
                        stack.append((f"{where}/{key}", value))
        for key, value in node.items():
            bad += [b for b in ragged_sweeps(value, f"{path}/{key}") if b not in bad]
    return bad


def test_robustness_results_checks_on_hand_written_cases():
    assert study_command('python -m scripts.study_x --a 1 --b "[1, 2]" --c=3') == ("scripts.study_x", ["a", "b", "c"])
    assert study_command("python scripts/study_y.py --out o") == ("scripts.study_y", ["out"])
    good = {"A": {"eps": [0, 1], "dice": [0.9, 0.5], "per_class": {"lung": [0.9, 0.4]}}, "note": [1, 2, 3]}
    assert ragged_sweeps(good) == []
    short = {"A": {"sigma": [0, 1, 2], "dice": [0.9, 0.5], "per_class": {"lung": [0.9]}}}
    assert sorted(ragged_sweeps(short)) == ["/A/dice", "/A/per_class/lung"]


def large_files_entries(text: str) -> list[dict]:
    """The entries of a model-zoo ``large_files.yml`` (flat ``key: "value"`` lines, ``- path:`` starts one)."""
    entries = []
    for line in text.splitlines():
        match = re.fullmatch(r"\s*(-\s*)?(\w+):\s*\"?([^\"]*)\"?\s*", line)
        if not match or line.lstrip().startswith("#") or match.group(2) == "large_files":
            continue
        if match.group(1):
            entries.append({})
        entries[-1][match.group(2)] = match.group(3)
    return entries


def test_large_files_parser_on_a_hand_written_file():
    text = ('# c\nlarge_files:\n  - path: "models/a.pt"\n    url: "u"\n    hash_val: ""\n    hash_type: "sha256"\n'
            '  - path: "m/b.pt"\n')
    assert large_files_entries(text) == [{"path": "models/a.pt", "url": "u", "hash_val": "", "hash_type": "sha256"},
                                         {"path": "m/b.pt"}]


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_zoo_files_data_license_large_files_and_readme_sections(name):
    bundle = BUNDLES / name
    licence = bundle / "docs" / "data_license.txt"
    assert licence.is_file() and len(licence.read_text().split()) > 20, f"{name}: docs/data_license.txt missing or empty"
    entries = large_files_entries((bundle / "large_files.yml").read_text())
    assert entries, f"{name}: large_files.yml lists no files"
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}, (name, entry)
        assert re.fullmatch(r"models/[\w/]*model\.pt", entry["path"]) and entry["url"], (name, entry)
        assert entry["hash_type"] == "sha256"
        # no weights are committed, so no hash: export_bundle.py writes the real one into the zip it builds
        assert entry["hash_val"] == "", f"{name}: large_files.yml carries a hash of weights that are not in the repository"
    headings = [h.strip() for h in re.findall(r"^#+\s*(.+)$", (bundle / "docs" / "README.md").read_text(), flags=re.M)]
    missing = [s for s in README_SECTIONS if not any(h.lower().startswith(s.lower()) for h in headings)]
    assert not missing, f"{name}: docs/README.md lacks the model-zoo sections {missing}"


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
           "--bundle_root", str(bundle)]  # MONAI's defaults: n = 1, p = 1, any = 1
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_every_bundle_has_an_export_shape():
    assert set(EXPORT_SHAPES) == set(ALL_BUNDLES), "add the new bundle's small input shape to EXPORT_SHAPES"


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_ckpt_export_embeds_metadata_and_matches_the_eager_network(name, tmp_path):
    """``monai.bundle.ckpt_export`` (the function behind ``python -m monai.bundle ckpt_export``) without
    ``use_trace`` on seeded weights saved as ``{"model": state_dict}``: the file is a scripted module (not a
    trace), carries metadata.json and inference.json and gives the eager network's output on a fresh random
    input."""
    shape = EXPORT_SHAPES[name]
    bundle = BUNDLES / name
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    (tmp_path / "models").mkdir()
    ckpt = tmp_path / "models" / "model.pt"
    torch.save({"model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}, ckpt)
    ts_path = tmp_path / "models" / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(ckpt), key_in_ckpt="model",
                meta_file=str(bundle / "configs" / "metadata.json"), config_file=str(bundle / "configs" / "inference.json"),
                bundle_root=str(bundle))
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(ts_path), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    assert meta["version"] == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    torch.manual_seed(1)
    x = torch.rand(shape)
    with torch.no_grad():
        expected, got = net.eval()(x), scripted(x)
    assert isinstance(got, torch.Tensor), f"{name}: the exported network returns {type(got).__name__}, not logits"
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
