"""The nlcen_lung bundle end to end through ``python -m monai.bundle run`` on tiny chest phantoms."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_run import BUNDLES, run_bundle
from common.networks.nlce import NLCE

BUNDLE = BUNDLES / "nlcen_lung"
TINY = {"phantom_cases": 8, "image_size": [64, 64], "batch_size": 2, "max_epochs": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Train the tiny NLCEN once (1 epoch) for the configs that need a checkpoint."""
    demo_dir = tmp_path_factory.mktemp("nlcen_demo")
    run_bundle("nlcen_lung", ["train.json", "demo.json"], {"demo_dir": str(demo_dir), **TINY})
    return demo_dir


def test_train_writes_checkpoints_and_resumes(trained, tmp_path):
    models = trained / "models" / "nlcen"
    assert (models / "model.pt").is_file()
    epoch1 = models / "checkpoint_checkpoint_epoch=1.pt"
    assert epoch1.is_file()
    ckpt = torch.load(epoch1, map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "trainer", "lr_scheduler"}
    assert ckpt["trainer"]["iteration"] == ckpt["trainer"]["epoch_length"]  # one epoch done
    # resume: a second run with max_epochs=2 continues at epoch 2 with the optimizer state restored
    proc = run_bundle("nlcen_lung", ["train.json", "demo.json"],
                      {"demo_dir": str(trained), **TINY, "max_epochs": 2, "resume": True})
    log = proc.stdout + proc.stderr
    assert "Epoch[2] Metrics" in log and "Epoch[1] Metrics" not in log
    resumed = torch.load(models / "checkpoint_checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    steps_per_epoch = -(-len(json.loads((trained / "data" / "datalist.json").read_text())["training"]) // 2)
    adam_steps = {int(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert adam_steps == {2 * steps_per_epoch}, "Adam's step count must carry over from epoch 1"


def test_attack_sweep_reports(trained):
    eps = [2, 8]
    run_bundle("nlcen_lung", ["train.json", "demo.json", "attack.json"],
               {"demo_dir": str(trained), **TINY, "attack#eps_pixels": eps})
    out = trained / "eval" / "nlcen" / "attack"
    summary = json.loads((out / "summary.json").read_text())
    n_test = len(json.loads((trained / "data" / "datalist.json").read_text())["test"])
    with open(out / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_test * (1 + len(eps))
    attacked = [e for e in summary["entries"] if e["attack"] == "targeted_ifgsm"]
    assert [round(e["eps_display"], 6) for e in attacked] == eps
    for e in attacked:  # the perturbation obeys the budget: RMSE ≤ ε in [0, 1] units
        assert e["mean"]["rmse"] <= e["eps_display"] / 255 + 1e-6
    assert (out / "summary.md").read_text().startswith("# nlcen under targeted I-FGSM")
    assert (out / "dice_vs_eps.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_and_inference(trained):
    run_bundle("nlcen_lung", ["train.json", "demo.json", "evaluate.json"], {"demo_dir": str(trained), **TINY})
    assert (trained / "eval" / "nlcen" / "evaluate" / "val_mean_dice_raw.csv").is_file()
    run_bundle("nlcen_lung", ["inference.json", "inference_demo.json"],
               {"demo_dir": str(trained), "image_size": [64, 64]})
    masks = sorted((trained / "eval" / "nlcen" / "inference").glob("*_seg.nii.gz"))
    images = sorted((trained / "data" / "imagesTr").glob("*.nii.gz"))
    assert len(masks) == len(images) == TINY["phantom_cases"]
    seg = nib.load(masks[0]).get_fdata()
    assert seg.squeeze().shape == nib.load(images[0]).shape and set(seg.ravel()) <= {0.0, 1.0}


def test_unet_variant_trains_and_attacks(tmp_path):
    overrides = {"demo_dir": str(tmp_path), **TINY, "unet_channels": [4, 8, 16]}
    run_bundle("nlcen_lung", ["train.json", "demo.json", "unet_nlce.json"], overrides)
    run_bundle("nlcen_lung", ["train.json", "demo.json", "unet_nlce.json", "attack.json"],
               {**overrides, "attack#eps_pixels": [4]})
    assert (tmp_path / "eval" / "unet_nlce" / "attack" / "summary.json").is_file()


def _network(*overrides: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in ("train.json", "demo.json", *overrides)])
    parser["bundle_root"] = str(BUNDLE)
    return parser.get_parsed_content("network_def")


def test_ablation_overrides_remove_exactly_their_modules():
    def names(net):
        return {n for n, _ in net.named_parameters()}

    full = names(_network())
    no_nl, no_ce, no_nlce = names(_network("no_nl.json")), names(_network("no_ce.json")), names(_network("no_nlce.json"))
    assert any("non_local" in n or ".nl." in n for n in full - no_nl)
    assert not (no_nl - full) and not (no_ce - full) and not (no_nlce - full)
    assert no_nlce == {n for n in full if not n.startswith("nlce.")}
    unet, unet_nlce = _network("unet.json"), _network("unet_nlce.json")
    assert sum(isinstance(m, NLCE) for m in unet_nlce.modules()) == 1
    assert not any(isinstance(m, NLCE) for m in unet.modules())


def test_skin_variant_builds_a_three_channel_resnet50():
    net = _network("skin.json").eval()
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(ValueError, match="^x"):
        net(torch.rand(1, 1, 64, 64))


def test_a_mask_with_labels_outside_the_declared_classes_is_rejected_naming_the_file(tmp_path):
    import nibabel as nib
    import numpy as np

    image, label = tmp_path / "img.nii.gz", tmp_path / "bad_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(64, 64).astype(np.float32), np.eye(4)), image)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 9  # not a chest label
    nib.save(nib.Nifti1Image(mask, np.eye(4)), label)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in ("train.json", "demo.json")])
    parser["bundle_root"] = str(BUNDLE)
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    with pytest.raises(RuntimeError) as info:
        preprocessing({"image": str(image), "label": str(label)})
    assert "bad_mask.nii.gz" in str(info.value.__cause__) and "[9.0]" in str(info.value.__cause__)
