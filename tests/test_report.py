"""common.report and common.reporting.plots: CSV round trip and column order, Markdown tables, mean ± sd
strings, PNG plots."""

from __future__ import annotations

import csv
import math

import matplotlib
import pytest
from PIL import Image

from common.io import atomic_write_bytes
from common.report import csv_text, format_mean_sd, markdown_table, write_csv
from common.reporting.plots import render_metric_vs_eps


def _summary():
    def entry(attack, eps, mean, sd):
        return {
            "attack": attack, "eps": eps, "eps_display": eps * 255, "n": 4,
            "mean": {"dice_mean": mean}, "sd": {"dice_mean": sd},
        }

    return {
        "entries": [
            entry("clean", 0.0, 0.9, 0.05),
            entry("fgsm", 2 / 255, 0.7, 0.1),
            entry("fgsm", 4 / 255, 0.5, None),
            entry("pgd", 2 / 255, 0.6, 0.1),
        ]
    }


def test_write_csv_column_order_and_exact_round_trip(tmp_path):
    rows = [
        {"case_id": "a", "attack": "clean", "dice": 1 / 3, "psnr": math.inf},
        {"case_id": "b", "attack": "fgsm", "dice": 0.1 + 0.2, "extra": 7},
    ]
    path = write_csv(tmp_path / "out" / "rows.csv", rows)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["case_id", "attack", "dice", "psnr", "extra"]
        back = list(reader)
    assert float(back[0]["dice"]) == 1 / 3 and float(back[1]["dice"]) == 0.1 + 0.2
    assert math.isinf(float(back[0]["psnr"])) and back[1]["psnr"] == "" and back[0]["extra"] == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.csv"]  # no temporary file left
    assert csv_text(rows, columns=["dice", "case_id", "attack", "psnr", "extra"]).splitlines()[0] == (
        "dice,case_id,attack,psnr,extra"
    )


def test_write_csv_rejects_non_rows(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        write_csv(tmp_path / "x.csv", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_format_mean_sd():
    assert format_mean_sd(0.8214, 0.0423) == "0.821 ± 0.042"
    assert format_mean_sd(27.694, 0.281, digits=2) == "27.69 ± 0.28"
    assert format_mean_sd(0.5, math.nan) == "0.500"
    assert format_mean_sd(0.5, None) == "0.500"
    assert format_mean_sd(math.inf, math.nan) == "inf"
    assert format_mean_sd(None) == "-"


def test_markdown_table_exact():
    rows = [{"name": "a|b", "v": 0.12345, "n": 3}, {"name": "c", "v": None}]
    text = markdown_table(rows, ["name", "v", "n"], float_format=".2f", headers=["Name", "Value", "N"])
    assert text == "| Name | Value | N |\n| --- | --- | --- |\n| a\\|b | 0.12 | 3 |\n| c | - | - |\n"
    with pytest.raises(ValueError, match="float_format"):
        markdown_table(rows, ["v"], float_format="q")
    with pytest.raises(ValueError, match="headers"):
        markdown_table(rows, ["v"], headers=["a", "b"])


def test_plot_metric_vs_eps_writes_png_without_touching_pyplot_backend(tmp_path):
    backend = matplotlib.get_backend()
    path = atomic_write_bytes(tmp_path / "plot.png", render_metric_vs_eps(_summary(), "dice_mean", eps_label="ε (0–255)"))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert matplotlib.get_backend() == backend
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_plot_unknown_metric_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="metric"):
        atomic_write_bytes(tmp_path / "plot.png", render_metric_vs_eps(_summary(), "iou_mean"))
    assert list(tmp_path.iterdir()) == []
