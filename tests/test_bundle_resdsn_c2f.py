"""ResDSN C2F bundle: the per-case z-normalisation front layer (ε in HU), the Table 6 / Table 8 reports,
and every config run end to end through ``python -m monai.bundle run`` on tiny abdomen phantoms."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bundle_run import run_bundle
from common.attacks import FGSM
from common.c2f import hu_window_normalise
from common.c2f_eval import drop_table, timed_evaluation
from common.data.synthetic import write_phantom_dataset
from common.networks.normalise import (
    PerCaseZNorm,
    hu_to_window,
    per_case_znorm,
    window_to_hu,
    znorm_input_gradient,
)
from common.sliding_window import SlidingWindowForward

BUNDLE = "resdsn_c2f_pancreas"


# ------------------------------------------------------------------------------- z-normalisation layer
def test_znorm_of_window_units_equals_paper_preprocessing():
    gen = torch.Generator().manual_seed(0)
    hu = torch.randint(-1000, 1500, (2, 1, 6, 5, 4), generator=gen).double()
    z_paper, _, _ = hu_window_normalise(hu)  # clip to [-100, 240] HU, z-normalise per case
    window = hu_to_window(hu.clamp(-100, 240))  # the bundle's input, in [0, 1]
    assert float(window.min()) >= 0 and float(window.max()) <= 1
    torch.testing.assert_close(per_case_znorm(window), z_paper.double(), rtol=1e-5, atol=1e-5)
    # each case uses its own statistics: scaling case 1 leaves case 0 unchanged
    scaled = window.clone()
    scaled[1] = scaled[1] * 3 + 1
    torch.testing.assert_close(per_case_znorm(scaled)[0], per_case_znorm(window)[0])


def test_eps_in_window_units_is_hu():
    lam = 240.0 - (-100.0)
    assert lam == 340.0
    assert window_to_hu(0.03) - window_to_hu(0.0) == pytest.approx(10.2)  # ε = 0.03 Λ
    assert window_to_hu(0.01) - window_to_hu(0.0) == pytest.approx(3.4)  # α = 0.01 Λ
    assert window_to_hu(1.0) == pytest.approx(240.0) and hu_to_window(-100.0) == 0.0
    # an FGSM perturbation of 0.03 in window units moves every unclipped voxel by exactly 10.2 HU
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).double()
    x = torch.rand(1, 1, 6, 6, 6, dtype=torch.float64) * 0.8 + 0.1
    y = (torch.rand(1, 1, 6, 6, 6) > 0.5).long()
    x_adv = FGSM(PerCaseZNorm(net), eps=0.03, clip=(0.0, 1.0))(x, y)
    delta_hu = (window_to_hu(x_adv) - window_to_hu(x)).abs()
    torch.testing.assert_close(delta_hu, torch.full_like(delta_hu, 10.2))


def test_znorm_input_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 4, 5, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (expected,) = torch.autograd.grad((per_case_znorm(x) * g).sum(), [x])
    torch.testing.assert_close(znorm_input_gradient(x.detach(), g), expected)
    with pytest.raises(ValueError, match="grad_z"):
        znorm_input_gradient(x.detach(), g[:1])


def test_window_mean_gradient_through_znorm_equals_exact_on_one_window():
    """With one window covering the volume, the paper's window-mean gradient is the exact gradient; the
    wrapper must chain it through the normalisation as autograd does."""
    torch.manual_seed(2)
    layers = (torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(3, 2, 1))
    net = torch.nn.Sequential(*layers).double()
    x = torch.rand(2, 1, 8, 8, 8, dtype=torch.float64)
    y = (torch.rand(2, 1, 8, 8, 8) > 0.6).long()
    loss = lambda logits, t: F.cross_entropy(logits, t[:, 0])  # noqa: E731
    wm = PerCaseZNorm(SlidingWindowForward(net, 8, overlap=0.0, aggregation="window_mean"))
    exact = PerCaseZNorm(SlidingWindowForward(net, 8, overlap=0.0, aggregation="exact"))
    assert hasattr(wm, "input_gradient") and not hasattr(exact, "input_gradient")
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(sum(loss(exact(xr[i : i + 1]), y[i : i + 1]) for i in range(2)), [xr])
    torch.testing.assert_close(wm.input_gradient(x, y, loss), expected)


def test_per_case_znorm_refuses_a_non_callable():
    with pytest.raises(ValueError, match="inner"):
        PerCaseZNorm(3)


# ------------------------------------------------------------------------------------------- reports
def test_timed_evaluation_and_drop_table(tmp_path):
    y = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    y[:, :, 1:3, 1:3, 1:3] = 1
    data = [{"image": y.float(), "label": y}]
    half = y.clone()
    half[:, :, 1] = 0  # 4 of 8 voxels: Dice = 2·4 / (4 + 8) = 2/3
    forwards = {"perfect": lambda x: (x > 0.5).long(), "half": lambda x: half}
    summary = timed_evaluation(forwards, data, 2, tmp_path)
    by = {e["pipeline"]: e for e in summary["entries"]}
    assert by["perfect"]["dice_mean_mean"] == 1.0
    assert by["half"]["dice_mean_mean"] == pytest.approx(2 / 3)
    assert all(e["seconds_mean"] >= 0 for e in summary["entries"])
    assert {p.name for p in tmp_path.iterdir()} == {"per_case.csv", "summary.json", "summary.md"}

    def sweep(clean, fgsm, ifgsm):
        def entry(a, m):
            return {"attack": a, "mean": {"dice_pancreas": m}, "sd": {"dice_pancreas": 0.1}}

        return {"entries": [entry("clean", clean), entry("FGSM", fgsm), entry("I-FGSM", ifgsm)]}

    sweeps = {"coarse": sweep(0.8784, 0.4268, 0.0201), "adv": sweep(0.7909, 0.6758, 0.6598)}
    rows = drop_table(sweeps, ["FGSM", "I-FGSM"], "dice_pancreas")
    assert rows[0]["drop"] == pytest.approx(0.8583)  # Table 8: 87.84 − 2.01
    assert rows[1]["drop"] == pytest.approx(0.1311)
    with pytest.raises(ValueError, match="PGD"):
        drop_table({"coarse": sweep(1, 1, 1)}, ["PGD"], "dice_pancreas")


# ------------------------------------------------------------------------ training configs (no training)
CONFIGS = Path(__file__).parents[1] / "bundles" / BUNDLE / "configs"


def _parser(files: list[str], **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("resdsn_case")
    write_phantom_dataset("abdomen", root, num_cases=3, size=[40, 40, 32], seed=3, fractions=[0.34, 0.33, 0.33])
    entry = json.loads((root / "datalist.json").read_text())["training"][0]
    return {k: str(root / entry[k]) for k in ("image", "label")}


def test_paper_default_is_cross_entropy_and_uniform_coarse_patches():
    parser = _parser(["train.json", "train_coarse.json"])
    assert parser.get_parsed_content("base_loss").lambda_dice == 0.0  # Eq. 1-3: cross-entropy only
    assert type(parser.get_parsed_content("train#random_transforms")[1]).__name__ == "RandSpatialCropSamplesd"
    fine = _parser(["train.json", "train_fine.json"])
    assert fine.get_parsed_content("base_loss").lambda_dice == 0.0


@pytest.mark.parametrize("loss, lambda_dice", [("dicece", 1.0), ("ce", 0.0)])
def test_phantom_config_selects_the_loss_and_pos_neg_patches(loss, lambda_dice):
    parser = _parser(["train.json", "phantom.json", "train_coarse.json"], phantom_loss=loss, phantom_neg=3.0)
    base = parser.get_parsed_content("base_loss")
    assert base.lambda_dice == lambda_dice and base.lambda_ce == 1.0
    sampler = parser.get_parsed_content("train#random_transforms")[1]
    assert type(sampler).__name__ == "RandCropByPosNegLabeld"
    assert sampler.cropper.pos_ratio == pytest.approx(1.0 / 4.0)  # pos / (pos + neg) = 1 / (1 + 3)


@pytest.mark.parametrize("extra", [[], ["phantom.json"]])
def test_fine_training_patches_always_cover_pancreas(phantom_case, extra):
    """Sec. 4.1.1: fine patches lie in the ground-truth box (+ margin) and are "assured to cover pancreatic
    voxels"; train_fine.json's pancreas-centred sampling wins over phantom.json's 1 : 1 sampling."""
    overrides = {"roi_size": [16, 16, 16], "fine_margin": 4, "patches_per_case": 6, "seed": 0}
    parser = _parser(["train.json", *extra, "train_fine.json"], **overrides)
    preprocessing = parser.get_parsed_content("train#preprocessing")
    preprocessing.set_random_state(seed=0)
    for _ in range(3):
        patches = preprocessing(dict(phantom_case))
        assert len(patches) == 6
        for patch in patches:
            assert patch["label"].shape[1:] == (16, 16, 16)
            assert int(patch["label"].sum()) > 0


def test_adv_train_init_checkpoint_loads_the_given_weights(tmp_path):
    from common.networks.resdsn import ResDSN

    torch.manual_seed(0)
    source = ResDSN(channels=(2, 4, 8, 16))
    torch.save({"model": source.state_dict()}, tmp_path / "model.pt")
    parser = _parser(["train.json", "adv_train.json"], channels=[2, 4, 8, 16], init_checkpoint=str(tmp_path / "model.pt"))
    network = parser.get_parsed_content("network")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(network.state_dict()[key], value)
    fresh = _parser(["train.json", "adv_train.json"], channels=[2, 4, 8, 16]).get_parsed_content("network")
    assert not torch.equal(fresh.state_dict()["conv1.conv.weight"], source.state_dict()["conv1.conv.weight"])


# ----------------------------------------------------------------------------------- bundle end to end
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Train coarse, fine and PGD-adversarial models in parallel, then run inference, the Table 6
    evaluation and the attack sweep in parallel, all on 6 tiny phantoms."""
    root = tmp_path_factory.mktemp("resdsn_demo")
    demo_cfg = json.loads((Path(__file__).parents[1] / "bundles" / BUNDLE / "configs" / "demo.json").read_text())
    write_phantom_dataset(
        "abdomen", root / "data", num_cases=demo_cfg["phantom_cases"], size=demo_cfg["image_size"], seed=0,
        fractions=demo_cfg["phantom_fractions"],
    )
    plain = {"demo_dir": str(root)}
    tiny = {**plain, "max_iterations": 2, "epoch_length": 1, "val_interval": 2}
    waves = [
        {
            "coarse": (["train.json", "train_coarse.json", "demo.json"], tiny),
            "fine": (["train.json", "train_fine.json", "demo.json"], tiny),
            "adv": (["train.json", "adv_train.json", "demo.json"], {**tiny, "adv#steps": 2}),
        },
        {
            "inference": (["inference.json", "demo.json"], plain),
            "evaluate": (["inference.json", "evaluate.json", "demo.json"], plain),
            "attack": (["inference.json", "attack.json", "demo.json"], {**plain, "attack#steps": 2}),
            "white_box": (["inference.json", "attack.json", "demo.json"], {
                **plain, "attack#steps": 2, "attack#c2f_source": "c2f", "output_dir": str(root / "eval_white_box")}),
        },
    ]
    logs = {}
    with ThreadPoolExecutor(max_workers=3) as pool:
        for wave in waves:
            futures = {k: pool.submit(run_bundle, BUNDLE, cfg, ov) for k, (cfg, ov) in wave.items()}
            logs.update({k: f.result().stdout for k, f in futures.items()})
    return root, logs


def test_bundle_training_writes_models(demo):
    root, logs = demo
    for stage in ("coarse", "fine", "adv_coarse"):
        obj = torch.load(root / "models" / stage / "model.pt", map_location="cpu", weights_only=True)
        state = obj.get("model", obj)  # CheckpointSaver stores a one-entry save_dict unwrapped
        assert "conv1.conv.weight" in state
        assert any(k.startswith("aux2") for k in state)  # deep supervision heads trained
    assert all("Engine run finished" in logs[k] for k in ("coarse", "fine", "adv"))


def test_bundle_inference_writes_nifti_masks(demo):
    root, _ = demo
    test_cases = json.loads((root / "data" / "datalist.json").read_text())["test"]
    preds = sorted((root / "eval" / "pred").glob("*_c2f.nii.gz"))
    assert len(preds) == len(test_cases) == 2
    for pred in preds:
        image = nib.load(root / "data" / "imagesTr" / pred.name.replace("_c2f", ""))
        mask = nib.load(pred)
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine)
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}


def test_bundle_table6_and_table8(demo):
    root, _ = demo
    table6 = json.loads((root / "eval" / "table6" / "summary.json").read_text())
    assert [e["pipeline"] for e in table6["entries"]] == ["ResDSN Coarse", "ResDSN Fine", "ResDSN C2F"]
    assert all(0 <= e["dice_mean_mean"] <= 1 and e["seconds_mean"] > 0 for e in table6["entries"])
    assert table6["entries"][2]["n"] == [1, 2]  # demo's n_coarse, n_fine
    rows = json.loads((root / "eval" / "attack" / "table8.json").read_text())
    assert [r["model"] for r in rows] == ["ResDSN Coarse", "ResDSN C2F"]
    for r in rows:
        assert r["drop"] == pytest.approx(r["clean_mean"] - min(r["attacked_means"].values()))
    coarse = json.loads((root / "eval" / "attack" / "coarse" / "summary.json").read_text())
    assert coarse["eps_values"] == [0.03]
    assert [e["eps_display"] for e in coarse["entries"][1:]] == pytest.approx([10.2, 10.2])  # HU
    assert coarse["attacks"] == ["FGSM", "I-FGSM"]
    assert (root / "eval" / "attack" / "table8.md").read_text().count("ResDSN") == 2
    # the white-box C2F sweep (attacks through CoarseToFineLogits) ran on the same cases
    white = json.loads((root / "eval_white_box" / "attack" / "c2f" / "summary.json").read_text())
    assert [e["attack"] for e in white["entries"]] == ["clean", "FGSM", "I-FGSM"]
    assert "white box" in (root / "eval_white_box" / "attack" / "c2f" / "summary.md").read_text()
    assert white["entries"][0]["mean"]["dice_pancreas"] == pytest.approx(
        json.loads((root / "eval" / "attack" / "c2f" / "summary.json").read_text())["entries"][0]["mean"]["dice_pancreas"])
