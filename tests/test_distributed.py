"""Scale-out under ``torchrun`` on the CPU (gloo, two processes): sharding, gathering, rank-0 output.

Oracles: the hand-computed blocks of ``numpy.array_split``; for the sweep and the certification, the
same run in one process (the reports must match case by case); for training, the plain network loads
the checkpoint rank 0 wrote.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.handlers import (
    CheckpointSaver,
    LrScheduleHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
)

from bundle_run import BUNDLES, REPO, run_bundle
from common import distributed
from common.handlers import MetricHistory
from common.checkpoint import load_weights


# ----------------------------------------------------------------------------------------- unit tests
@pytest.mark.parametrize("n, world", [(10, 3), (2, 4), (0, 2), (7, 1), (8, 2)])
def test_shard_blocks_cover_every_item_once_in_order(n, world):
    items = [f"case_{i}" for i in range(n)]
    blocks = [distributed.shard(items, r, world) for r in range(world)]
    expected = [list(b) for b in np.array_split(np.array(items, dtype=object), world)]
    assert blocks == expected
    assert [x for b in blocks for x in b] == items  # concatenation by rank restores the order
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 if n else sizes == [0] * world


def test_shard_hand_computed_and_bad_arguments():
    assert [distributed.shard(range(10), r, 3) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="rank"):
        distributed.shard([1, 2], 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        distributed.shard([1, 2], 0, 0)


def test_single_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False and not distributed.is_distributed()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.is_main_process()
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.shard([3, 1, 2]) == [3, 1, 2]
    batches = [{"image": torch.zeros(b, 1, 2, 2)} for b in (2, 3, 1)]
    got = [(k, off, b["image"].shape[0]) for k, off, b in distributed.shard_batches(batches)]
    assert got == [(0, 0, 2), (1, 2, 3), (2, 5, 1)]
    assert distributed.num_local_batches(batches) == 3
    assert distributed.num_local_batches(iter(batches)) is None
    assert distributed.device_from_env() == torch.device("cpu")


def test_rank0_handlers_keep_training_handlers_and_drop_writers_off_rank0(tmp_path, monkeypatch):
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    keep = [ValidationHandler(validator=None, interval=1), LrScheduleHandler(scheduler)]
    writers = [
        StatsHandler(), TensorBoardStatsHandler(log_dir=str(tmp_path / "tb")),
        CheckpointSaver(str(tmp_path / "ckpt"), {"model": net}, save_final=True),
        MetricHistory(tmp_path / "h.csv"),
    ]
    handlers = [keep[0], writers[0], keep[1], *writers[1:]]
    assert distributed.rank0_handlers(handlers) == handlers  # rank 0 keeps everything
    assert distributed.rank0_handlers(None) == []
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    assert distributed.rank0_handlers(handlers) == keep
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")) == []  # the dropped writer left no file


def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(1, 2, 3, padding=1).eval()


def _tiny_batches(n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.rand(1, 1, 8, 8, generator=g)
        out.append({"image": x, "label": (x > 0.5).long()})
    return out


def test_progress_bars_on_rank0_only_and_other_ranks_write_nothing(tmp_path, capsys, monkeypatch):
    import common.certification_report as cr
    import common.evaluation as ev

    ev.evaluate_cases(_tiny_net(), _tiny_batches(), [], 2, progress=True, desc="tiny sweep")
    err = capsys.readouterr().err  # stderr is not a terminal here: one line at the end, no per-frame bars
    assert "tiny sweep" in err and "2/2" in err and len(err.strip().splitlines()) == 1
    ev.evaluate_cases(_tiny_net(), _tiny_batches(), [], 2, progress=False, desc="tiny sweep")
    assert "tiny sweep" not in capsys.readouterr().err
    kwargs = dict(n0=2, n=8, alpha=0.01, batch_size=8, title="tiny cert")
    methods = {"m": {"forward": _tiny_net()}}
    run0 = cr.CertificationRun(methods, [0.25], 2, ["bg", "fg"], tmp_path / "r0", **kwargs)
    run0.run(_tiny_batches())
    assert "tiny cert" in capsys.readouterr().err and (tmp_path / "r0" / "summary.json").is_file()
    # a rank other than 0: no bar, no file, the same summary returned
    import common.evaluation.engine as engine

    monkeypatch.setattr(engine, "is_main_process", lambda: False)  # the engine alone decides who writes
    sweep = ev.RobustnessSweep(_tiny_net(), {}, [0.0], 2, tmp_path / "s1", title="rank1 sweep")
    assert sweep.run(_tiny_batches())["n_cases"] == 2
    summary = cr.CertificationRun({"m": {"forward": _tiny_net()}}, [0.25], 2, ["bg", "fg"], tmp_path / "r1",
                                  **kwargs).run(_tiny_batches())
    assert summary["entries"] == json.loads((tmp_path / "r0" / "summary.json").read_text())["entries"]
    assert not (tmp_path / "s1").exists() and not (tmp_path / "r1").exists()
    err = capsys.readouterr().err
    assert "rank1 sweep" not in err and "tiny cert" not in err


# ----------------------------------------------------------------------------------------- torchrun
SCRIPT = '''
import functools
import sys

import torch
from torch.utils.data import DataLoader

from common import distributed
from common.attacks import FGSM, IFGSM
from common.certification_report import CertificationRun
from common.evaluation import RobustnessSweep


def cases():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(5):
        x = torch.rand(1, 16, 16, generator=g)
        out.append({"image": x, "label": (x > 0.5).long(), "case_id": f"case_{i}"})
    return out


def run(out_dir):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3, padding=1)
    ).eval()
    attacks = {
        "fgsm": functools.partial(FGSM, net, loss="ce", clip=(0.0, 1.0)),
        "ifgsm": functools.partial(IFGSM, net, alpha=0.01, steps=3, clip=(0.0, 1.0)),
    }
    for title, data in [("loader sweep", DataLoader(cases(), batch_size=2)),
                        ("list sweep", list(DataLoader(cases(), batch_size=1)))]:
        out = f"{out_dir}/{title.split()[0]}"
        sweep = RobustnessSweep(net, attacks, [0.0, 0.02, 0.05], 2, out, title=title)
        sweep.run(data)
    cert = CertificationRun({"base": {"forward": net, "denoiser": None}}, [0.25, 0.5], 2, ["bg", "fg"],
                            f"{out_dir}/certify", n0=4, n=32, alpha=0.01, batch_size=16, seed=0, title="cert")
    cert.run(DataLoader(cases(), batch_size=1))


if __name__ == "__main__":
    distributed.init_from_env()
    run(sys.argv[1])
    distributed.destroy()
'''


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N ...`` (a free port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same_value(a, b) -> bool:
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    return (math.isnan(fa) and math.isnan(fb)) or fa == fb or abs(fa - fb) <= 1e-6


def _assert_same_rows(one: Path, two: Path) -> None:
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) > 0 and [list(r) for r in a] == [list(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            assert _same_value(ra[key], rb[key]), (one.name, key, ra, rb)


def _assert_same_json(a, b, where="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            _assert_same_json(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_json(x, y, f"{where}/{i}")
    else:
        assert _same_value(a, b) if a is not None else b is None, (where, a, b)


def _bar_totals(log: str, desc: str) -> set[int]:
    return {int(t) for t in re.findall(re.escape(desc) + r":\s+\d+%\|[^|]*\|\s*\d+/(\d+)", log)}


def test_sweep_and_certification_under_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "sharded_run.py"
    script.write_text(SCRIPT)
    runpy.run_path(str(script))["run"](str(tmp_path / "one"))
    proc = _torchrun([str(script), str(tmp_path / "two")], cwd=tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    for sub in ("loader", "list"):
        _assert_same_rows(one / sub / "per_case.csv", two / sub / "per_case.csv")
        _assert_same_json(json.loads((one / sub / "summary.json").read_text()),
                          json.loads((two / sub / "summary.json").read_text()))
        assert sorted(p.name for p in (two / sub).iterdir()) == sorted(p.name for p in (one / sub).iterdir())
    rows = _rows(two / "loader" / "per_case.csv")
    assert [r["case_id"] for r in rows] == [f"case_{i}" for i in range(5)] * 5  # clean + 2 attacks × 2 eps
    for name in ("per_case.csv", "clean_per_case.csv"):
        _assert_same_rows(one / "certify" / name, two / "certify" / name)
    cert_rows = [(r["case"], float(r["sigma"])) for r in _rows(two / "certify" / "per_case.csv")]
    # the batches' case ids (one derivation for every report), rows by sigma then case (the engine's order)
    assert cert_rows == [(f"case_{i}", s) for s in (0.25, 0.5) for i in range(5)]
    _assert_same_json(json.loads((one / "certify" / "summary.json").read_text()),
                      json.loads((two / "certify" / "summary.json").read_text()))
    la = torch.load(one / "certify" / "certified_labels.pt", weights_only=True)
    lb = torch.load(two / "certify" / "certified_labels.pt", weights_only=True)
    assert list(la) == list(lb) and all(torch.equal(la[k], lb[k]) for k in la)
    # one progress bar, rank 0's: it counts rank 0's shard only (3 loader batches -> 2; 5 listed -> 3)
    log = proc.stderr + proc.stdout
    assert _bar_totals(log, "loader sweep") == {2}
    assert _bar_totals(log, "list sweep") == {3}
    assert _bar_totals(log, "cert") == {3}


TINY = {"phantom_cases": 10, "image_size": [64, 64], "batch_size": 2, "max_epochs": 1}


def _bundle_args(name: str, configs: list[str], overrides: dict) -> list[str]:
    from scripts.bundle_run import bundle_command

    return bundle_command(name, configs, overrides)


def test_nlcen_trains_with_ddp_and_its_sweep_under_two_ranks_equals_one_process(tmp_path):
    demo = tmp_path / "demo"
    overrides = {"demo_dir": str(demo), **TINY}
    configs = ["train.json", "demo.json", "multi_gpu_train.json"]
    proc = _torchrun(_bundle_args("nlcen_lung", configs, overrides), cwd=BUNDLES / "nlcen_lung")
    log = proc.stdout + proc.stderr
    models = demo / "models" / "nlcen"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_checkpoint_epoch=1.pt", "model.pt"]
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "nlcen_lung" / "configs" / c) for c in ("train.json", "demo.json")])
    parser.update({"bundle_root": str(BUNDLES / "nlcen_lung"), **overrides})
    for ckpt in models.iterdir():  # rank 0 saved the unwrapped module: it loads strictly into network_def
        net = load_weights(parser.get_parsed_content("network_def", lazy=False), ckpt)
        assert not any(k.startswith("module.") for k in net.state_dict())
    events = list((demo / "eval").rglob("events.out.tfevents.*"))
    assert len({p.name.split(".")[-2] for p in events}) == 1  # TensorBoard files from one process only
    assert len(re.findall(r"Epoch: 1/1, Iter: 1/\d+ -- train_loss", log)) == 1  # StatsHandler on rank 0 only
    steps = re.findall(r"Epoch: 1/1, Iter: \d+/(\d+) -- train_loss", log)
    assert steps and int(steps[0]) == 2  # 6 training cases, 2 ranks, batch 2: each rank takes 2 steps

    sweep = {**overrides, "attack#eps_pixels": [2, 8]}
    configs = ["train.json", "demo.json", "attack.json"]
    run_bundle("nlcen_lung", configs, {**sweep, "attack#output_dir": str(tmp_path / "one")})
    _torchrun(_bundle_args("nlcen_lung", [*configs, "multi_gpu_attack.json"],
                           {**sweep, "attack#output_dir": str(tmp_path / "two")}), cwd=BUNDLES / "nlcen_lung")
    _assert_same_rows(tmp_path / "one" / "per_case.csv", tmp_path / "two" / "per_case.csv")
    _assert_same_json(json.loads((tmp_path / "one" / "summary.json").read_text()),
                      json.loads((tmp_path / "two" / "summary.json").read_text()))
    assert (tmp_path / "two" / "summary.md").read_text() == (tmp_path / "one" / "summary.md").read_text()
