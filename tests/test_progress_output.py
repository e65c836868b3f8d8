"""Progress output of training reads cleanly (issue #16 item 11): in a terminal the progress bar and the
log records never share a line; with stderr in a file there are no per-iteration bar frames.

A real MONAI ``SupervisedTrainer`` (3 epochs × 6 iterations) logs every iteration with MONAI's
``StatsHandler`` through a root-logger console handler and shows a progress bar. The terminal is
emulated: the text written to stdout and stderr (one screen) is replayed with ``\\r`` returning to
column 0 and ``\\n`` starting a new line, and the screen's lines are checked. ignite's own bar reproduces
the issue in the same setting; ``common.progress.ProgressBar`` does not.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
import torch.nn as nn
from ignite.handlers import ProgressBar as IgniteProgressBar
from monai.engines import SupervisedTrainer
from monai.handlers import StatsHandler, from_engine

from bundle_run import BUNDLES
from common.progress import ProgressBar

EPOCHS, ITERATIONS = 3, 6
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"  # the bundles' logging.conf


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _screen(text: str) -> list[str]:
    """The lines a terminal shows after ``text`` (``\\r``: back to column 0, overwriting)."""
    lines, line, col = [], [], 0
    for ch in text:
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    lines.append("".join(line).rstrip())
    return [ln for ln in lines if ln]


def _train(monkeypatch, stream, bar_cls) -> str:
    """Train with stdout and stderr both going to ``stream``; return what was written."""
    monkeypatch.setattr("sys.stdout", stream)
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    stats = StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True))
    for own in stats.logger.handlers:  # MONAI's logger has its own console handler, made once per process
        monkeypatch.setattr(own, "stream", stream)
    try:
        net = nn.Conv2d(1, 1, 1)
        data = [{"image": torch.ones(1, 1, 2, 2), "label": torch.ones(1, 1, 2, 2)}] * ITERATIONS
        trainer = SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=EPOCHS, train_data_loader=data, network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.01), loss_function=nn.MSELoss(),
            train_handlers=[stats, bar_cls(mininterval=0)],
        )
        trainer.run()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return stream.getvalue()


def _is_bar(line: str) -> bool:
    return "%|" in line


def _is_record(line: str) -> bool:
    return " - INFO - " in line


def _iteration_records(lines: list[str]) -> list[str]:
    return [ln for ln in lines if _is_record(ln) and ", Iter: " in ln]


def test_ignite_bar_shares_lines_with_log_records(monkeypatch):
    """The issue, reproduced with ignite's bar: a log record continues the bar's line."""
    screen = _screen(_train(monkeypatch, _Terminal(), IgniteProgressBar))
    assert any(_is_bar(ln) and _is_record(ln) for ln in screen)


def test_terminal_bar_and_records_on_separate_lines(monkeypatch):
    text = _train(monkeypatch, _Terminal(), ProgressBar)
    screen = _screen(text)
    records = _iteration_records(screen)
    assert len(records) == EPOCHS * ITERATIONS  # StatsHandler: one per iteration, each whole
    assert not any(_is_bar(ln) and _is_record(ln) for ln in screen)
    assert all(ln[:4].isdigit() and ln.count(" - INFO - ") == 1 for ln in screen if _is_record(ln))
    assert "%|" in text  # the bar was shown


def test_log_file_has_no_bar_frames(monkeypatch):
    """stderr (and stdout) into a file: the records only, no bar; ignite's bar writes a frame per update."""
    text = _train(monkeypatch, io.StringIO(), ProgressBar)
    assert "%|" not in text and "\r" not in text
    assert len(_iteration_records(text.splitlines())) == EPOCHS * ITERATIONS
    ignite = _train(monkeypatch, io.StringIO(), IgniteProgressBar)
    assert ignite.count("%|") >= EPOCHS * (ITERATIONS - 1)  # the per-frame output this fixes


def test_explicit_disable_and_file_arguments():
    assert ProgressBar(file=_Terminal()).tqdm_kwargs["disable"] is False
    assert ProgressBar(file=io.StringIO()).tqdm_kwargs["disable"] is True
    assert ProgressBar(file=io.StringIO(), disable=False).tqdm_kwargs["disable"] is False
    assert "disable" not in ProgressBar(file=io.StringIO(), terminal_only=False).tqdm_kwargs


@pytest.mark.parametrize("bundle", ["certified_seg", "nlcen_lung", "resdsn_c2f_pancreas", "unet3d_brats_distill",
                                    "unet_advaug"])
def test_bundles_use_the_clean_bar(bundle):
    for path in (BUNDLES / bundle / "configs").glob("*.json"):
        text = path.read_text(encoding="utf-8")
        assert "ignite.handlers.ProgressBar" not in text, path
    train = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text(encoding="utf-8"))
    assert any(isinstance(h, dict) and h.get("_target_") == "common.progress.ProgressBar"
               for h in train["train"]["handlers"])
