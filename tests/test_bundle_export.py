"""``scripts/export_bundle.py``: every bundle exports to a zip that runs on its own.

Each bundle is exported into ``tmp_path`` (outside the repository), unzipped into an empty folder, and its
demo training config is run there with ``python -m monai.bundle run`` as a user of the zip would.

Isolation from the repository: the project's editable install registers an import finder (a ``.pth`` file
in site-packages) that maps ``common`` and ``scripts`` to the repository, so a plain interpreter would
silently fall back to the repository's ``common``. The runs therefore use ``python -S`` (no ``site``
processing, hence no ``.pth`` files and no finder) with ``PYTHONPATH`` set to exactly the interpreter's
site-packages (the installed dependencies), from the unzipped bundle's root (``-m`` puts the cwd first on
``sys.path``). The same interpreter set-up first proves that ``common`` cannot be imported there and that
``scripts`` is the bundle's own package.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from bundle_run import BUNDLES
from scripts.export_bundle import export_bundle, import_closure, rewrite_config, rewrite_module_source

ALL_BUNDLES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir())

# The cheapest config of each bundle that trains (and validates) on its demo phantoms, with tiny sizes.
DEMO_RUNS = {
    "certified_seg": (["train.json", "demo.json"], {"max_epochs": 1}),
    "nlcen_lung": (["train.json", "demo.json"], {"phantom_cases": 8, "batch_size": 2, "max_epochs": 1}),
    "resdsn_c2f_pancreas": (["train.json", "train_coarse.json", "demo.json"],
                            {"max_iterations": 2, "epoch_length": 1, "val_interval": 2}),
    "unet3d_brats_distill": (["train.json", "demo.json"], {
        "phantom_size": [24, 24, 24], "image_size": [16, 16, 16], "phantom_cases": 5,
        "phantom_fractions": [0.4, 0.2, 0.4], "max_epochs": 1}),
    "unet_advaug": (["train.json", "demo.json"], {"phantom_cases": 6, "max_epochs": 1}),
}


def _isolated_env() -> dict:
    """Environment for ``python -S``: the installed dependencies only, nothing from the repository."""
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _unzip(zip_path: Path, dest: Path) -> Path:
    dest.mkdir()
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(dest)
    (bundle,) = list(dest.iterdir())
    return bundle


def test_every_bundle_has_a_demo_run_here():
    assert set(DEMO_RUNS) == set(ALL_BUNDLES), "add the new bundle's tiny demo run to DEMO_RUNS"


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_exported_zip_runs_standalone(name, tmp_path):
    zip_path = export_bundle(name, tmp_path / "dist")
    bundle = _unzip(zip_path, tmp_path / "unzipped")
    assert bundle.name == name and not (bundle / "demo").exists() and not (bundle / "models").exists()
    configs_text = "".join(p.read_text() for p in (bundle / "configs").glob("*.json"))
    assert not re.search(r"(?<![\w.])common\.", configs_text), "a config still points at the repository's common"
    env = _isolated_env()
    probe = ("import importlib.util as u, os, scripts.common as c; "
             "assert u.find_spec('common') is None, 'repository common is importable'; "
             "assert os.path.realpath(c.__file__).startswith(os.path.realpath(os.getcwd())), c.__file__")
    proc = subprocess.run([sys.executable, "-S", "-c", probe], cwd=bundle, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

    configs, overrides = DEMO_RUNS[name]
    cmd = [sys.executable, "-S", "-m", "monai.bundle", "run",
           "--config_file", json.dumps([f"configs/{c}" for c in configs]),
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value)]
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    weights = sorted((bundle / "demo").rglob("model.pt"))
    assert weights, "the demo run wrote no model.pt"
    state = torch.load(weights[0], map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_weights_are_packaged_as_model_state_dict_with_their_real_sha256(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 3)
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)  # what CheckpointSaver writes for a one-entry save_dict
    zip_path = export_bundle("unet_advaug", tmp_path / "dist", include_weights=True, weights=bare)
    with zipfile.ZipFile(zip_path) as archive:
        data = archive.read("unet_advaug/models/model.pt")
        large_files = archive.read("unet_advaug/large_files.yml").decode()
        info = json.loads(archive.read("unet_advaug/docs/export_info.json"))
        inference = json.loads(archive.read("unet_advaug/configs/inference.json"))
    # the released bundle serves the packaged weights (where MONAI Label and Deploy look)
    assert inference["ckpt_dir"] == "$@bundle_root + '/models'"
    assert "'/model.pt'" in inference["checkpoint"]
    packaged = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    assert set(packaged) == {"model"}
    for key, value in net.state_dict().items():
        assert torch.equal(packaged["model"][key], value) and packaged["model"][key].device.type == "cpu"
    fields = dict(re.findall(r"^\s*-?\s*(\w+):\s*\"?([^\"\n]*)\"?\s*$", large_files, flags=re.M))
    assert fields["path"] == "models/model.pt" and fields["hash_type"] == "sha256"
    assert fields["hash_val"] == hashlib.sha256(data).hexdigest()
    assert info["weights_included"] is True and "common.defenses.advaug" in info["vendored_modules"]
    assert info["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["commit"])


def test_two_model_bundle_packages_each_file_listed_in_large_files(tmp_path):
    sources = {}
    for i, entry in enumerate(("models/coarse/model.pt", "models/fine/model.pt")):
        torch.manual_seed(i)
        sources[entry] = tmp_path / f"w{i}.pt"
        torch.save({"model": torch.nn.Conv3d(1, 2, 1).state_dict(), "optimizer": {}}, sources[entry])
    with pytest.raises(ValueError, match="mapping"):
        export_bundle("resdsn_c2f_pancreas", tmp_path / "dist", include_weights=True, weights=sources["models/fine/model.pt"])
    mapping = {k: str(v) for k, v in sources.items()}
    zip_path = export_bundle("resdsn_c2f_pancreas", tmp_path / "dist", include_weights=True, weights=mapping)
    with zipfile.ZipFile(zip_path) as archive:
        yml = archive.read("resdsn_c2f_pancreas/large_files.yml").decode()
        for entry, source in sources.items():
            data = archive.read(f"resdsn_c2f_pancreas/{entry}")
            assert f'hash_val: "{hashlib.sha256(data).hexdigest()}"' in yml
            packaged = torch.load(io.BytesIO(data), weights_only=True)
            original = torch.load(source, weights_only=True)["model"]
            assert set(packaged) == {"model"} and all(torch.equal(packaged["model"][k], v) for k, v in original.items())


def test_export_is_reproducible_and_vendors_only_what_the_configs_need(tmp_path):
    first = export_bundle("nlcen_lung", tmp_path / "a").read_bytes()
    second = export_bundle("nlcen_lung", tmp_path / "b").read_bytes()
    assert first == second
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        names = set(archive.namelist())
    assert "nlcen_lung/scripts/common/networks/nlcen.py" in names and "nlcen_lung/scripts/__init__.py" in names
    # the evaluation engine's smoothing perturbation needs certify.py; nothing of the 3D coarse-to-fine
    # pipeline, the denoisers, the robustness card or the studies is needed by this bundle's configs
    assert "nlcen_lung/scripts/common/certify.py" in names
    for unused in ("c2f.py", "denoise.py", "card/runner.py", "studies/core.py", "data/pancreas.py"):
        assert f"nlcen_lung/scripts/common/{unused}" not in names


def test_import_closure_follows_configs_and_module_imports(tmp_path):
    lib = tmp_path / "common"
    (lib / "sub").mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "sub" / "__init__.py").write_text("from common.sub.leaf import f\n")
    (lib / "sub" / "leaf.py").write_text("def f():\n    from common import helper\n    return helper\n")
    (lib / "helper.py").write_text("import os\n")
    (lib / "unused.py").write_text("")
    assert import_closure({"common.sub.leaf"}, tmp_path) == {"common", "common.sub", "common.sub.leaf", "common.helper"}


def test_rewrites_point_at_the_vendored_package():
    src = "from common.io import atomic_path\nimport common.io as cio\nfrom common import io\nimport os\n"
    assert rewrite_module_source(src) == (
        "from scripts.common.io import atomic_path\nimport scripts.common.io as cio\n"
        "from scripts.common import io\nimport os\n"
    )
    with pytest.raises(ValueError, match="import common.io"):
        rewrite_module_source("import common.io\n", "m.py")
    config = {"imports": ["$import os", "$import common", "$import common.attacks"],
              "net": {"_target_": "common.networks.nlcen.NLCEN"}, "note": "common sense, not common.x.y code",
              "f": "$lambda x: common.attacks.FGSM(x)"}
    out = rewrite_config(config)
    assert out["imports"] == ["$import scripts", "$import os", "$import scripts.common", "$import scripts.common.attacks"]
    assert out["net"]["_target_"] == "scripts.common.networks.nlcen.NLCEN"
    assert out["note"] == "common sense, not scripts.common.x.y code"
    assert out["f"] == "$lambda x: scripts.common.attacks.FGSM(x)"


def test_unknown_bundle_and_bad_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="name"):
        export_bundle("no_such_bundle", tmp_path)
    with pytest.raises(FileNotFoundError, match="weights"):
        export_bundle("unet_advaug", tmp_path, include_weights=True, weights=tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        export_bundle("unet_advaug", tmp_path, include_weights=True, weights=bad)
    assert not (tmp_path / "unet_advaug.zip").exists()
