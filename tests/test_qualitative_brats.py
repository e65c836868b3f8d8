"""Fig. 9 of Liu et al., J. Digit. Imaging 2021 (input slice, ground truth, clean prediction, perturbation,
attacked prediction) as ``configs/qualitative.json`` of ``unet3d_brats_distill``: run with MONAI's CLI on
tiny brain phantoms (one epoch), then the figure's panels checked against the predictions they show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from monai.bundle import ConfigParser

from common.evaluation.engine import Scoring
from common.evaluation.qualitative import evaluate_examples, qualitative_panels, render_qualitative
from common.reporting.plots import label_colours
from tests.bundle_run import BUNDLES, run_bundle

NAME = "unet3d_brats_distill"
CONFIGS = ["train.json", "demo.json", "attack.json", "qualitative.json"]
EPS = 0.3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats_qualitative")
    overrides = {
        "demo_dir": str(root), "phantom_size": [24, 24, 24], "image_size": [16, 16, 16], "phantom_cases": 5,
        "phantom_fractions": [0.4, 0.2, 0.4], "max_epochs": 1,
    }
    run_bundle(NAME, ["train.json", "demo.json"], overrides)
    run_bundle(NAME, CONFIGS, {**overrides, "attack#eps": EPS})
    return root, overrides


def test_qualitative_figure_shows_what_the_attack_changed(run):
    root, overrides = run
    pngs = sorted((root / "eval" / "unet3d" / "qualitative").glob("*.png"))
    assert [p.stem for p in pngs] == ["brain_000", "brain_001"]  # the two test cases
    image = imread(pngs[0])
    assert image.ndim == 3 and image.shape[1] > 4 * image.shape[0] > 0  # one row of five panels
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 10  # drawn, not blank

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / NAME / "configs" / f) for f in CONFIGS])
    for key, value in {**overrides, "attack#eps": EPS, "bundle_root": str(BUNDLES / NAME)}.items():
        parser[key] = value
    q = {k: parser.get_parsed_content(f"qualitative#{k}") for k in ("model", "attack", "attack_name")}
    batches = [b for _, b in zip(range(1), parser.get_parsed_content("attack#dataloader"))]
    result = evaluate_examples(q["model"], batches, q["attack_name"], EPS, q["attack"],
                               Scoring(4, regions=parser.get_parsed_content("regions")))
    clean, adv = result.artifacts["brain_000/clean"], result.artifacts["brain_000/attack"]
    panels = qualitative_panels(clean, adv, 4, parser.get_parsed_content("input_range"))
    assert [p[0].split(" ")[0] for p in panels] == ["input", "ground", "clean", "perturbation,", "attacked"]
    y = clean["y"]
    k = int(torch.argmax((y[0] > 0).any(0).sum(dim=(0, 1))))  # the slice with the most tumour
    # the input, the truth and both predictions are that slice, coloured by class
    np.testing.assert_allclose(panels[0][1], clean["x"][0, 0, ..., k].double().numpy())
    np.testing.assert_array_equal(panels[1][1], label_colours(y[0, 0, ..., k].numpy(), 4))
    np.testing.assert_array_equal(panels[2][1], label_colours(clean["pred"][0, 0, ..., k].numpy(), 4))
    np.testing.assert_array_equal(panels[4][1], label_colours(adv["pred"][0, 0, ..., k].numpy(), 4))
    # the perturbation panel is x_adv − x, an FGSM step of size ε (or less where clipped to [0, 1])
    delta = panels[3][1]
    np.testing.assert_allclose(delta, (adv["x"] - clean["x"])[0, 0, ..., k].double().numpy(), atol=1e-6)
    lim = float(np.abs(delta).max())
    assert 0 < lim <= EPS + 1e-6 and panels[3][3:] == (-lim, lim)  # symmetric colour limits
    # the two prediction panels differ exactly where the attack changed the prediction, and it did
    changed = (clean["pred"] != adv["pred"])[0, 0, ..., k].numpy()
    assert changed.any()
    np.testing.assert_array_equal((panels[2][1] != panels[4][1]).any(-1), changed)
    # the title carries the defence's run name and the Dice of both predictions, from the engine's rows
    dice = {r["kind"]: r["dice_WT"] for r in result.rows if r["case_id"] == "brain_000"}
    title = f"unet3d, case brain_000: fgsm at eps = 0.3; Dice WT clean {dice['clean']:.3f}, attacked {dice['attack']:.3f}"
    # the PNG on disk is these panels with that title, rendered
    assert render_qualitative(panels, title) == pngs[0].read_bytes()
