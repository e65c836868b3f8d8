"""common.evaluation.engine and the report-set writers of common.io: rows against numpy oracles, ensembles
returning records, sigmoid outputs, NaN outputs naming the case, validated cache entries, output checks
before any work, report sets written whole, temporaries of killed runs cleaned (issues #13, #16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common.io as cio
from common.evaluation import RobustnessSweep
from common.evaluation.engine import CaseCache, Scoring, attacked, clean, evaluate, smoothed

REPO = Path(__file__).resolve().parents[1]


class Threshold(torch.nn.Module):
    """Two-class logits (1 − x, x − 0.5·1) per pixel: class 1 where x > 0.5; counts its calls."""

    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        self.calls, self.nan = 0, nan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = torch.cat([0.5 - x, x - 0.5], dim=1)
        return out * float("nan") if self.nan else out


def _batches(n: int = 3, size: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.rand(1, 1, size, size, generator=g)
        y = (torch.rand(1, 1, size, size, generator=g) > 0.5).long()
        out.append({"image": x, "label": y, "case_id": [f"c{i}"]})
    return out


def _dice(p: np.ndarray, t: np.ndarray) -> float:
    return 1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum())


def test_rows_schema_order_and_values_with_an_ensemble_returning_records():
    net = Threshold()
    shift = lambda x, y: ((x + 0.2).clamp(0, 1), {"member": "shift"})  # noqa: E731  (x_adv, records)
    perts = [clean(), attacked("shift", 0.2, shift)]
    result = evaluate(net, _batches(), perts, Scoring(2, class_names=["bg", "fg"]))
    assert [(r["perturbation"], r["case_id"]) for r in result.rows] == [
        ("clean", "c0"), ("clean", "c1"), ("clean", "c2"), ("shift", "c0"), ("shift", "c1"), ("shift", "c2")]
    for row, batch in zip(result.rows, _batches() * 2):
        x = batch["image"] + (0.2 if row["kind"] == "attack" else 0.0)
        pred, truth = (x.clamp(0, 1) > 0.5).numpy(), batch["label"].numpy() == 1
        assert row["dice_fg"] == pytest.approx(_dice(pred, truth), abs=1e-12)
        assert row["eps"] == (0.2 if row["kind"] == "attack" else 0.0) and row["sigma"] == 0.0
        assert row["seconds"] > 0 and list(row)[:8] == ["case_id", "model", "perturbation", "kind", "eps", "sigma",
                                                         "seconds", "cpu_seconds"]
    assert "psnr" in result.rows[3] and "psnr" not in result.rows[0]


def test_sigmoid_multilabel_rows_equal_numpy():
    class TwoChannels(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x - 0.3, x - 0.7], dim=1)

    batches = _batches(2)
    for b in batches:  # overlapping binary channels, like BraTS TC / WT
        b["label"] = torch.cat([b["image"] > 0.25, b["image"] > 0.75], dim=1).long()
    rows = evaluate(TwoChannels(), batches, [clean()], Scoring(2, class_names=["A", "B"], output="sigmoid")).rows
    for row, b in zip(rows, batches):
        x = b["image"].numpy()
        assert row["dice_A"] == pytest.approx(_dice(x > 0.3, x > 0.25), abs=1e-12)
        assert row["dice_B"] == pytest.approx(_dice(x > 0.7, x > 0.75), abs=1e-12)


def test_nan_output_raises_naming_the_case(tmp_path):
    sweep = RobustnessSweep(Threshold(nan=True), {}, [0.0], 2, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"NaN or Inf.*case c0"):
        sweep.run(_batches())
    assert not (tmp_path / "out" / "summary.json").exists()
    perts = [smoothed(0.25, 2, 4, 0.01, 0.75, batch_size=4)]
    with pytest.raises(ValueError, match=r"NaN or Inf.*smoothing.*case c0"):
        evaluate(Threshold(nan=True), _batches(1), perts, Scoring(2, include_background=True))


@pytest.mark.parametrize("damage", ["truncated_npz", "empty_list_json", "truncated_json"])
def test_bad_cache_entry_is_recomputed_with_a_warning_naming_it(tmp_path, damage):
    net, cache = Threshold(), CaseCache(tmp_path / "cache", "key1")
    observer = lambda k, ids, m, p, x, y, o: {f"{ids[0]}/pred": o["pred"].numpy()}  # noqa: E731
    batches = [{**b, "fingerprint": {"h": i}, "need_arrays": True} for i, b in enumerate(_batches(2))]
    first = evaluate(net, batches, [clean()], Scoring(2), cache=cache, observer=observer)
    calls = net.calls
    again = evaluate(net, batches, [clean()], Scoring(2), cache=cache, observer=observer)
    assert net.calls == calls and again.reused == 2 and again.rows == first.rows
    np.testing.assert_array_equal(again.artifacts["c1/pred"], first.artifacts["c1/pred"])
    bad = tmp_path / "cache" / ("c1.npz" if damage == "truncated_npz" else "c1.json")
    data = bad.read_bytes()
    bad.write_bytes(b"[]" if damage == "empty_list_json" else data[: len(data) // 2])
    with pytest.warns(UserWarning, match=str(bad)):
        third = evaluate(net, batches, [clean()], Scoring(2), cache=cache, observer=observer)
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # noqa: E731
    assert third.reused == 1 and net.calls == calls + 1 and untimed(third.rows) == untimed(first.rows)
    # another settings hash or other input files: recomputed, silently
    assert evaluate(net, batches, [clean()], Scoring(2), cache=CaseCache(tmp_path / "cache", "key2")).reused == 0


def test_output_folder_checked_before_any_work(tmp_path, monkeypatch):
    net = Threshold()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="not writable"):
        RobustnessSweep(net, {}, [0.0], 2, blocker / "out", progress=False).run(_batches())
    monkeypatch.setattr(cio.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(OSError, match="MiB free"):
        RobustnessSweep(net, {}, [0.0], 2, tmp_path / "full", progress=False).run(_batches())
    assert net.calls == 0


def test_disk_full_while_writing_leaves_no_report(tmp_path, monkeypatch):
    import common.evaluation.sweep as sweep_module

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    out = tmp_path / "out"
    monkeypatch.setattr(sweep_module, "render_metric_vs_eps", full)
    with pytest.raises(OSError):
        RobustnessSweep(Threshold(), {}, [0.0], 2, out, progress=False).run(_batches())
    assert sorted(p.name for p in out.iterdir()) == []  # not 3 of the 4 reports: none


def test_write_report_set_is_whole_and_the_manifest_detects_a_mixed_set(tmp_path):
    out = tmp_path / "set"
    cio.write_report_set(out, {"a.txt": "old a", "b.bin": b"old b"}, manifest=True)

    def failing(path):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        cio.write_report_set(out, {"a.txt": "new a", "b.bin": failing}, manifest=True)
    assert (out / "a.txt").read_text() == "old a" and cio.read_manifest(out)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.bin", "manifest.json"]
    (out / "a.txt").write_text("new a")  # what a kill between two moves leaves
    with pytest.raises(ValueError, match="a.txt does not match"):
        cio.read_manifest(out)


def test_temporaries_of_a_killed_writer_are_removed_on_the_next_run(tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from common.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out / "summary.json")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".summary.json.") and left[0].endswith(".tmp")
    with pytest.warns(UserWarning, match="stale temporary"):
        cio.write_report_set(out, {"summary.json": json.dumps({"ok": 1})})
    assert [p.name for p in out.iterdir()] == ["summary.json"]


def test_sigmoid_outputs_are_certified_per_channel():
    class TwoChannels(torch.nn.Module):
        def forward(self, x):
            return torch.cat([40 * (x - 0.3), 40 * (x - 0.7)], dim=1)

    batches = _batches(1, size=12)
    b = batches[0]
    b["label"] = torch.cat([b["image"] > 0.25, b["image"] > 0.75], dim=1).long()
    kept = {}
    observer = lambda k, ids, m, p, x, y, o: kept.update(pred=o["pred"]) if p.kind == "smoothing" else None  # noqa: E731
    perts = [smoothed(0.05, 4, 64, 0.01, 0.75, batch_size=16)]
    row = evaluate(TwoChannels(), batches, perts, Scoring(2, class_names=["A", "B"], output="sigmoid"),
                   observer=observer).rows[0]
    x, y, pred = b["image"][0, 0].numpy(), b["label"][0].numpy().astype(bool), kept["pred"][0].numpy()
    abstained = []
    for c, (name, t) in enumerate((("A", 0.3), ("B", 0.7))):
        keep = pred[c] != -1
        np.testing.assert_array_equal(pred[c][keep], (x > t)[keep])  # certified pixels carry the base class
        assert not keep[np.abs(x - t) < 0.01].any() if (np.abs(x - t) < 0.01).any() else True
        assert row[f"dice_{name}"] == pytest.approx(_dice((pred[c] == 1) & keep, y[c] & keep), abs=1e-12)
        assert row[f"dice_strict_{name}"] == pytest.approx(_dice(pred[c] == 1, y[c]), abs=1e-12)
        abstained.append(1 - keep.mean())
    assert row["abstained_fraction"] == pytest.approx(np.mean(abstained), abs=1e-12)
    assert 0 < row["abstained_fraction"] < 0.5
