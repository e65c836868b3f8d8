"""common.evaluation: Wilcoxon / Bonferroni / Holm against scipy and statsmodels, and the robustness sweep
end to end on a tiny conv net with stand-in attacks (files, row counts, values, failure atomicity)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import scipy.stats
import torch
from monai.data import MetaTensor
from statsmodels.stats.multitest import multipletests

from common.evaluation import RobustnessSweep, paired_wilcoxon, summarise, compare_with_clean
from common.metrics import BRATS_REGIONS, perturbation_scores, segmentation_scores

OUTPUTS = ["dice_vs_eps.png", "per_case.csv", "summary.json", "summary.md"]


# ----------------------------------------------------------------------------------------- statistics
def test_paired_wilcoxon_equals_scipy():
    rng = np.random.default_rng(0)
    clean = rng.random(12)
    shift = rng.random((3, 12)) * np.array([[0.0], [0.05], [0.3]])
    attacked = clean[None] - shift + rng.normal(0, 0.02, (3, 12))
    p = paired_wilcoxon(clean, attacked)
    expected = [scipy.stats.wilcoxon(attacked[i], clean).pvalue for i in range(3)]
    np.testing.assert_allclose(p, expected, rtol=1e-12)


@pytest.mark.parametrize("n", [5, 60])  # exact and normal-approximation regimes
def test_paired_wilcoxon_all_differences_zero_is_one(n):
    clean = np.linspace(0, 1, n)
    p = paired_wilcoxon(clean, np.stack([clean, clean + 0.1]))
    assert p[0] == 1.0
    assert p[1] == pytest.approx(scipy.stats.wilcoxon(clean + 0.1, clean).pvalue, rel=1e-12) and p[1] < 0.1


def test_adjusted_pvalues_equal_statsmodels():
    rng = np.random.default_rng(1)
    clean = rng.random((2, 15))
    attacked = clean[:, None] - rng.random((2, 5, 15)) * rng.random((1, 5, 1)) * 0.2
    out = compare_with_clean(clean, attacked)
    for m in range(2):
        expected_p = [scipy.stats.wilcoxon(attacked[m, k], clean[m]).pvalue for k in range(5)]
        np.testing.assert_allclose(out["p_wilcoxon"][m], expected_p, rtol=1e-12)
        for method in ("bonferroni", "holm"):
            adj = multipletests(out["p_wilcoxon"][m], alpha=0.05, method=method)[1]
            np.testing.assert_allclose(out[f"p_{method}"][m], adj, rtol=1e-12)


def test_summarise_mean_sd_and_pairing():
    rows = []
    for attack, eps, vals in (("clean", 0.0, [0.9, 0.8, 0.7, 0.95]), ("a", 0.1, [0.5, 0.6, 0.65, 0.4])):
        for i, v in enumerate(vals):
            row = {"case_id": f"c{i}", "attack": attack, "eps": eps, "eps_display": eps}
            rows.append({**row, "dice_mean": v, "rmse": eps})
    s = summarise(rows)
    assert s["n_cases"] == 4 and s["tested_metrics"] == ["dice_mean"]
    clean, att = s["entries"]
    assert clean["mean"]["dice_mean"] == pytest.approx(np.mean([0.9, 0.8, 0.7, 0.95]))
    assert att["sd"]["dice_mean"] == pytest.approx(np.std([0.5, 0.6, 0.65, 0.4], ddof=1))
    assert att["p_wilcoxon"]["dice_mean"] == pytest.approx(
        scipy.stats.wilcoxon([0.5, 0.6, 0.65, 0.4], [0.9, 0.8, 0.7, 0.95]).pvalue
    )
    rows[-1]["case_id"] = "other"
    with pytest.raises(ValueError, match="do not match"):
        summarise(rows)


# ----------------------------------------------------------------------------------------- the sweep
class TinyNet(torch.nn.Module):
    """1 → K channel conv net; counts forward calls."""

    def __init__(self, num_classes: int = 3, aux: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, num_classes, 3, padding=1)
        self.aux, self.calls = aux, 0

    def forward(self, x):
        self.calls += 1
        out = self.conv(x * 4 - 2)
        return [out, out * 0.5] if self.aux else out


class SignShift:
    """Stand-in attack: x + eps·sign(x − 0.5), clipped to [0, 1] (deterministic: the test redoes it)."""

    built: list[float] = []

    def __init__(self, eps: float):
        self.eps, self.calls = eps, 0
        SignShift.built.append(eps)

    def __call__(self, x, y):
        assert y.dtype == torch.int64 and y.shape[1] == 1
        self.calls += 1
        return (x + self.eps * torch.sign(x - 0.5)).clamp(0, 1)


class Noise:
    """Stand-in attack: x + eps·sign(uniform noise) from a seeded generator, clipped to [0, 1]."""

    def __init__(self, eps: float):
        self.eps, self.gen = eps, torch.Generator().manual_seed(1)

    def __call__(self, x, y):
        return (x + self.eps * torch.sign(torch.rand(x.shape, generator=self.gen) - 0.5)).clamp(0, 1)


def _data(n_batches=3, batch=2, size=8, seed=0, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        x = torch.rand(batch, 1, size, size, generator=g)
        y = torch.randint(0, num_classes, (batch, 1, size, size), generator=g)
        out.append({"image": x, "label": y, "case_id": [f"case{b}_{i}" for i in range(batch)]})
    return out


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sweep_writes_reports_with_values_equal_direct_metrics(tmp_path):
    net = TinyNet()
    SignShift.built = []
    eps_values = [0.0, 0.05, 0.1]
    sweep = RobustnessSweep(
        net, {"shift": SignShift, "noise": Noise}, eps_values, num_classes=3, output_dir=tmp_path / "out",
        class_names=["bg", "a", "b"], eps_scale=1 / 255, eps_unit="0–255", progress=False, title="tiny",
    )
    assert sorted(SignShift.built) == [0.05, 0.1]  # built once per nonzero eps, never for eps = 0
    data = _data()
    summary = sweep.run(data)

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    n_cases = 6
    assert net.calls == 3 * (1 + 2 * 2)  # one clean pass per batch, one per (attack, nonzero eps) per batch
    assert [a.calls for n, e, a in sweep.attacks if n == "shift"] == [3, 3]

    rows = _read_csv(out / "per_case.csv")
    assert len(rows) == n_cases * (1 + 2 * 2)
    assert list(rows[0])[:4] == ["case_id", "attack", "eps", "eps_display"]
    assert set(rows[0]) >= {"dice_a", "dice_b", "iou_a", "dice_mean", "iou_mean", "psnr", "ssim"}
    by_key = {(r["case_id"], r["attack"], float(r["eps"])): r for r in rows}
    assert len(by_key) == len(rows)

    # Direct oracle for the deterministic attack at eps = 0.1 and for clean.
    x = torch.cat([d["image"] for d in data])
    y = torch.cat([d["label"] for d in data])
    ids = [c for d in data for c in d["case_id"]]
    with torch.no_grad():
        clean_pred = net.conv(x * 4 - 2).argmax(1, keepdim=True)
        x_adv = (x + 0.1 * torch.sign(x - 0.5)).clamp(0, 1)
        adv_pred = net.conv(x_adv * 4 - 2).argmax(1, keepdim=True)
    seg_clean = segmentation_scores(clean_pred, y, 3, class_names=["bg", "a", "b"])
    seg_adv = segmentation_scores(adv_pred, y, 3, class_names=["bg", "a", "b"])
    pert = perturbation_scores(x_adv, x)
    for i, cid in enumerate(ids):
        rc, ra = by_key[(cid, "clean", 0.0)], by_key[(cid, "shift", 0.1)]
        assert float(ra["eps_display"]) == pytest.approx(0.1 * 255)
        for k, v in seg_clean.items():
            assert float(rc[k]) == pytest.approx(v[i].item(), abs=1e-7)
            assert float(ra[k]) == pytest.approx(seg_adv[k][i].item(), abs=1e-7)
        for k, v in pert.items():
            assert float(ra[k]) == pytest.approx(v[i].item(), rel=1e-9)
        assert float(rc["psnr"]) == float("inf") and float(rc["ssim"]) == 1.0 and float(rc["rmse"]) == 0.0

    # summary.json equals the returned summary; its tests equal scipy / statsmodels on the CSV columns.
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    entries = {(e["attack"], e["eps"]): e for e in on_disk["entries"]}
    assert list(entries) == [("clean", 0.0), ("shift", 0.05), ("shift", 0.1), ("noise", 0.05), ("noise", 0.1)]
    clean_vals = np.array([float(by_key[(c, "clean", 0.0)]["dice_mean"]) for c in ids])
    keys = list(entries)[1:]
    ps = []
    for attack, eps in keys:
        vals = np.array([float(by_key[(c, attack, eps)]["dice_mean"]) for c in ids])
        e = entries[(attack, eps)]
        assert e["n"] == n_cases
        assert e["mean"]["dice_mean"] == pytest.approx(vals.mean(), abs=1e-7)
        assert e["sd"]["dice_mean"] == pytest.approx(vals.std(ddof=1), abs=1e-7)
        p = 1.0 if np.all(vals == clean_vals) else scipy.stats.wilcoxon(vals, clean_vals).pvalue
        assert e["p_wilcoxon"]["dice_mean"] == pytest.approx(p, rel=1e-9)
        ps.append(p)
    holm = [entries[k]["p_holm"]["dice_mean"] for k in keys]
    np.testing.assert_allclose(holm, multipletests(ps, method="holm")[1])
    assert set(on_disk["tested_metrics"]) == {"dice_a", "dice_b", "dice_mean"}
    assert entries[("clean", 0.0)]["mean"]["psnr"] is None  # inf is not JSON: null

    md = (out / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 5 and "ε (0–255)" in table[0] and "p (dice_mean)" in table[0]
    assert table[3].startswith("| shift | 12.75 |")
    assert (out / "dice_vs_eps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_regions_case_ids_from_meta_and_deep_supervision(tmp_path):
    net = TinyNet(num_classes=5, aux=True)
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (2, 1, 6, 6), generator=g)].float()
    meta = {"filename_or_obj": ["/d/p1.nii.gz", "/d/p2.nii.gz"]}
    image = MetaTensor(torch.rand(2, 1, 6, 6, generator=g), meta=meta)
    sweep = RobustnessSweep(
        net, {"shift": SignShift}, [0.1], num_classes=5, output_dir=tmp_path, regions=BRATS_REGIONS,
        progress=True, metric_for_plot="dice_WT",
    )
    summary = sweep.run([{"image": image, "label": labels}, {"image": image.as_tensor(), "label": labels}])
    rows = _read_csv(tmp_path / "per_case.csv")
    assert len(rows) == 4 * 2
    assert [r["case_id"] for r in rows[:4]] == ["p1", "p2", "case_002", "case_003"]  # common.metrics.case_id
    assert {"dice_WT", "dice_TC", "dice_ET", "iou_ET"} <= set(rows[0])
    assert summary["tested_metrics"] == ["dice_WT", "dice_TC", "dice_ET", "dice_mean"]


def _no_files(path):
    return not path.exists() or list(path.iterdir()) == []


@pytest.mark.parametrize("bad", ["label_shape", "nan_image", "label_range"])
def test_sweep_bad_input_raises_and_writes_nothing(tmp_path, bad):
    data = _data(n_batches=2)
    if bad == "label_shape":
        data[1]["label"] = data[1]["label"][..., :-1]
    elif bad == "nan_image":
        data[1]["image"][0, 0, 0, 0] = float("nan")
    else:
        data[1]["label"][0, 0, 0, 0] = 3
    sweep = RobustnessSweep(TinyNet(), {"shift": SignShift}, [0.1], 3, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="label" if bad != "nan_image" else "image"):
        sweep.run(data)
    assert _no_files(tmp_path / "out")


def test_sweep_failure_midway_leaves_no_partial_output(tmp_path):
    class FailsOnSecondBatch(SignShift):
        def __call__(self, x, y):
            if self.calls == 1:
                raise RuntimeError("boom")
            return super().__call__(x, y)

    out = tmp_path / "out"
    sweep = RobustnessSweep(TinyNet(), {"flaky": FailsOnSecondBatch}, [0.1], 3, out, progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        sweep.run(_data(n_batches=3))
    assert _no_files(out)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(metric_for_plot="dice_nope"), "metric_for_plot"),
        (dict(eps_values=[-0.1]), "eps_values"),
        (dict(eps_values=[]), "eps_values"),
        (dict(data_range=0.0), "data_range"),
        (dict(correction="sidak"), "correction"),
        (dict(attacks={"clean": SignShift}), "attacks"),
        (dict(regions={"X": [9]}), "regions"),
    ],
)
def test_sweep_bad_config(tmp_path, kwargs, match):
    args = dict(forward=TinyNet(), attacks={"shift": SignShift}, eps_values=[0.1], num_classes=3)
    args["output_dir"] = tmp_path / "o"
    with pytest.raises(ValueError, match=match):
        RobustnessSweep(**{**args, **kwargs})
    assert _no_files(tmp_path / "o")


def test_forward_with_wrong_channels_raises(tmp_path):
    sweep = RobustnessSweep(TinyNet(num_classes=4), {"shift": SignShift}, [0.1], 3, tmp_path / "o")
    with pytest.raises(ValueError, match="forward"):
        sweep.run(_data(n_batches=1))
    assert _no_files(tmp_path / "o")


def test_wilcoxon_with_one_case_is_one():
    from common.evaluation import paired_wilcoxon

    p = paired_wilcoxon(np.array([[0.9]]), np.array([[[0.5], [0.9]]]))
    assert p.shape == (1, 2) and (p == 1.0).all()
