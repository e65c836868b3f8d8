"""Tests of the robustness-card renderer (issue #9): Markdown numbers, self-contained HTML, escaping,
PNGs, validation, and a headless-Chromium check of the HTML page (console errors + screenshot)."""

from __future__ import annotations

import base64
import copy
import html
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import browser_check
from common.reporting.card import FILES, render_card

CLASSES = ["liver", "tumour <&> core"]
CASES = ["case_000", 'case<&>"1"', "case_002", "case|3"]
ATTACKS = {"fgsm_dice": "FGSM", "ifgsm_ce": "IFGSM", "pgd_dice": "PGD"}
EPS = [1 / 255, 4 / 255, 8 / 255]
SIGMAS = [0.25, 0.5]


def _maybe_none(rng: np.random.Generator, value: float, p: float = 0.1) -> float | None:
    return None if rng.random() < p else value


def make_card(seed: int = 0) -> dict:
    """A card dict as SCHEMA.md describes it: 2 classes, 3 attacks × 3 ε, 2 σ, some None values."""
    rng = np.random.default_rng(seed)
    clean_case = {c: {k: float(rng.uniform(0.6, 0.95)) for k in CLASSES} for c in CASES}
    clean_case[CASES[2]][CLASSES[1]] = None  # class absent from case and prediction: Dice undefined
    clean_mean = {k: float(np.mean([v[k] for v in clean_case.values() if v[k] is not None])) for k in CLASSES}
    clean_sd = {
        k: float(np.std([v[k] for v in clean_case.values() if v[k] is not None], ddof=1)) for k in CLASSES
    }
    attacks = []
    for name in ATTACKS:
        for e in EPS:
            per_case = {
                c: {
                    k: (None if clean_case[c][k] is None else float(clean_case[c][k] * rng.uniform(0.2, 1)))
                    for k in CLASSES
                }
                for c in CASES
            }
            vals = {k: [v[k] for v in per_case.values() if v[k] is not None] for k in CLASSES}
            attacks.append(
                {
                    "name": name,
                    "eps": e,
                    "eps_input_units": e * 221.0,
                    "mean": {k: float(np.mean(vals[k])) for k in CLASSES},
                    "sd": {k: float(np.std(vals[k], ddof=1)) for k in CLASSES},
                    "p_wilcoxon": {k: _maybe_none(rng, float(10 ** rng.uniform(-6, 0))) for k in CLASSES},
                    "p_adjusted": {k: _maybe_none(rng, float(10 ** rng.uniform(-5, 0))) for k in CLASSES},
                    "per_case": per_case,
                }
            )
    attacks[-1]["p_wilcoxon"][CLASSES[0]] = None
    attacks[-1]["p_adjusted"][CLASSES[0]] = None
    attacks[0]["p_adjusted"][CLASSES[1]] = 0.0004567
    attacks[1]["p_adjusted"][CLASSES[1]] = 0.0421
    certification = []
    for s in SIGMAS:
        per_case = {
            c: {
                "certified_dice": {k: float(rng.uniform(0.3, 0.9)) for k in CLASSES},
                "abstain_fraction": float(rng.uniform(0, 0.4)),
            }
            for c in CASES
        }
        certification.append(
            {
                "sigma": s,
                "sigma_input_units": s * 221.0,
                "certified_dice": {CLASSES[0]: float(rng.uniform(0.3, 0.9)), CLASSES[1]: None},
                "abstain_fraction": float(rng.uniform(0, 0.4)),
                "certified_radius": s * 0.253347,
                "per_case": per_case,
            }
        )
    fwd = 0.0123
    parts = {
        name: {"s_per_case": fwd * r, "ratio_to_forward": r} for name, r in zip(ATTACKS, (2.1, 11.3, 41.7))
    }
    parts |= {
        f"certification@sigma={s}": {"s_per_case": fwd * 1234.5, "ratio_to_forward": 1234.5} for s in SIGMAS
    }
    return {
        "schema_version": 1,
        "title": "Robustness card: nlcen_lung 0.1.0",
        "created": "2026-11-22T07:30:00Z",
        "command": "python -m scripts.robustness_card --bundle_root bundles/nlcen_lung --eps '[0.004]'",
        "bundle": {
            "root": "bundles/nlcen_lung",
            "name": "nlcen_lung",
            "version": "0.1.0",
            "config": "configs/inference.json",
            "checkpoint": None,
            "checkpoint_sha256": None,
            "network": "common.networks.nlcen.NLCEN",
            "inferer": {
                "type": "SlidingWindowInferer",
                "roi_size": [32, 32],
                "overlap": 0.25,
                "mode": "gaussian",
            },
            "spatial_dims": 2,
            "num_classes": 3,
            "class_names": CLASSES,
        },
        "data": {"datalist": "data/datalist.json", "num_cases": len(CASES), "case_ids": CASES},
        "units": {
            "input_range": [0.0, 1.0],
            "range_source": "ScaleIntensityRanged(a_min=-57, a_max=164, b_min=0, b_max=1)",
            "eps_unit": "fraction of the input range (0-1)",
            "eps": EPS,
            "eps_input_units": [e * 221.0 for e in EPS],
            "sigma_unit": "fraction of the input range (0-1)",
            "sigma_input_units": [s * 221.0 for s in SIGMAS],
        },
        "settings": {
            "seed": 0,
            "attacks": {
                n: {
                    "attack": a,
                    "loss": n.split("_")[1],
                    "targeted": False,
                    "steps": 1 if a == "FGSM" else 10,
                    "alpha": "eps/4",
                    "target": None,
                }
                for n, a in ATTACKS.items()
            },
            "certification": {
                "sigmas": SIGMAS,
                "n0": 10,
                "n": 100,
                "alpha": 0.001,
                "tau": 0.6,
                "correction": "holm",
                "batch_size": 16,
            },
            "wilcoxon": {"alternative": "greater", "correction": "holm"},
        },
        "versions": {
            "python": "3.11.2",
            "torch": "2.13.0",
            "monai": "1.6.1",
            "numpy": "2.4.0",
            "robust_seg_monai": "0.1.0",
            "platform": "Linux-x86_64",
        },
        "clean": {"mean": clean_mean, "sd": clean_sd, "per_case": clean_case},
        "attacks": attacks,
        "certification": certification,
        "cost": {"clean_forward_s_per_case": fwd, "parts": parts},
        "examples": {
            "case_id": CASES[1],
            "slice_axis": None,
            "slice_index": None,
            "attack": "pgd_dice",
            "eps": EPS[-1],
            "sigma": SIGMAS[0],
        },
        "cache": {"dir": ".card_cache/abc", "reused_cases": 1, "computed_cases": 3},
        "notes": [
            "weights untrained: numbers show the pipeline, not the paper",
            "tiny phantom <data> & 4 cases",
        ],
    }


def make_examples(h: int = 48, w: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """A disc phantom, its sign-gradient-like perturbation, and label maps with abstentions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    label = (r < 14).astype(np.int64) + (r < 6).astype(np.int64)
    image = np.clip(0.2 + 0.3 * label + 0.05 * rng.standard_normal((h, w)), 0, 1)
    delta = (8 / 255) * np.sign(rng.standard_normal((h, w)))
    adversarial = np.clip(image + delta, 0, 1)
    pred_clean = np.where(r < 13, 1, 0) + np.where(r < 7, 1, 0)
    pred_adv = np.where(r < 9, 1, 0)
    pred_cert = pred_clean.copy()
    pred_cert[(r > 11) & (r < 15)] = -1
    return {
        "image": image,
        "adversarial": adversarial,
        "perturbation": adversarial - image,
        "label": label,
        "pred_clean": pred_clean,
        "pred_adversarial": pred_adv,
        "pred_certified": pred_cert,
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    card = make_card()
    out = tmp_path_factory.mktemp("card")
    paths = render_card(copy.deepcopy(card), make_examples(), out)
    return card, out, paths


# --------------------------------------------------------------------------------- independent oracles
# The expected Markdown of the user strings above, written out by hand (CommonMark backslash escapes).
MD_NAME = {
    "liver": "liver",
    "tumour <&> core": r"tumour \<\&\> core",
    "case_000": "case_000",
    'case<&>"1"': r'case\<\&\>"1"',
    "case_002": "case_002",
    "case|3": r"case\|3",
    "fgsm_dice": "fgsm_dice",
    "ifgsm_ce": "ifgsm_ce",
    "pgd_dice": "pgd_dice",
}


def _dice(x):
    return "–" if x is None else f"{x:.3f}"


def _mean_sd(m, s):
    return "–" if m is None else (f"{m:.3f}" if s is None else f"{m:.3f} ± {s:.3f}")


def _p(p):
    if p is None:
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _g4(x):
    return f"{x:.4g}"


def _md_tables(md: str) -> list[list[list[str]]]:
    """Every GFM table of ``md`` as rows of cells (header row first, separator dropped)."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _table_with(tables, header0: str, header1: str | None = None):
    for t in tables:
        if t[0][0] == header0 and (header1 is None or t[0][1] == header1):
            return t
    raise AssertionError(f"no table with headers {header0!r}, {header1!r}")


def test_writes_every_file_with_the_schema_names(rendered):
    _card, out, paths = rendered
    assert set(paths) == {"md", "html", "dice_vs_eps", "certified_dice_vs_sigma", "examples"}
    for key, path in paths.items():
        assert path == out / FILES[key] and path.is_file() and path.stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES.values())  # no temporary files left


def test_markdown_tables_hold_the_card_numbers(rendered):
    card, _out, paths = rendered
    md = paths["md"].read_text(encoding="utf-8")
    tables = _md_tables(md)
    # clean Dice, mean and per case
    clean = _table_with(tables, "Class")
    assert clean[0][1] == "Dice mean ± sd over 4 cases"
    assert clean[1:] == [
        [MD_NAME[c], _mean_sd(card["clean"]["mean"][c], card["clean"]["sd"][c])] for c in CLASSES
    ]
    per_case = _table_with(tables, "Case", f"Dice {CLASSES[0]}")
    assert per_case[1:] == [
        [MD_NAME[case]] + [_dice(card["clean"]["per_case"][case][c]) for c in CLASSES] for case in CASES
    ]
    # attacks: one row per attack × ε × class, in card order
    attack_rows = _table_with(tables, "Attack", "ε (fraction of the input range (0-1))")
    expected = []
    for a in card["attacks"]:
        for c in CLASSES:
            m, cm = a["mean"][c], card["clean"]["mean"][c]
            expected.append(
                [
                    MD_NAME[a["name"]],
                    _g4(a["eps"]),
                    _g4(a["eps_input_units"]),
                    MD_NAME[c],
                    _mean_sd(m, a["sd"][c]),
                    "%+.3f" % (m - cm),
                    _p(a["p_wilcoxon"][c]),
                    _p(a["p_adjusted"][c]),
                ]
            )
    assert attack_rows[1:] == expected
    assert attack_rows[0][-1] == "p (holm-adjusted)"
    # the hand-set p-values and None cells, spelled out
    assert (
        attack_rows[2][-1] == "4.6e-04"
        and attack_rows[4][-1] == "0.042"
        and attack_rows[-2][-2:] == ["–", "–"]
    )
    # certification per σ
    cert = _table_with(tables, "σ (fraction of the input range (0-1))", "σ (input units)")
    assert cert[1:] == [
        [
            _g4(r["sigma"]),
            _g4(r["sigma_input_units"]),
            _dice(r["certified_dice"][CLASSES[0]]),
            "–",
            _dice(r["abstain_fraction"]),
            _g4(r["certified_radius"]),
        ]
        for r in card["certification"]
    ]
    # cost: the clean forward first (ratio 1), then every part
    cost = _table_with(tables, "Part")
    assert cost[1] == ["clean forward", _g4(card["cost"]["clean_forward_s_per_case"]), "1.0"]
    assert cost[2:] == [
        [name, _g4(p["s_per_case"]), "{:.1f}".format(p["ratio_to_forward"])]
        for name, p in card["cost"]["parts"].items()
    ]
    assert ["certification@sigma=0.25", _g4(0.0123 * 1234.5), "1234.5"] in cost
    # versions, settings JSON, notes and the image links
    versions = _table_with(tables, "Component")
    assert versions[1:] == [[k, v] for k, v in card["versions"].items()]
    assert '"n0": 10' in md and '"correction": "holm"' in md
    assert f"```\n{card['command']}\n```" in md and "`.card_cache/abc` (1 reused, 3 computed" in md
    assert r"- tiny phantom \<data\> \& 4 cases" in md
    for key in ("dice_vs_eps", "certified_dice_vs_sigma", "examples"):
        assert f"]({FILES[key]})" in md
    assert "fraction of the input range (0-1)" in md and "ScaleIntensityRanged(a_min=-57" in md


def test_html_is_self_contained_and_embeds_the_pngs(rendered):
    _card, _out, paths = rendered
    page = paths["html"].read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert "<link" not in page.lower() and "url(" not in page and "@import" not in page
    sources = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]*)""", page, flags=re.IGNORECASE)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    on_disk = [paths[k].read_bytes() for k in ("dice_vs_eps", "certified_dice_vs_sigma", "examples")]
    assert embedded == on_disk
    assert re.search(r"""\bhref\s*=""", page, flags=re.IGNORECASE) is None


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self._in = [], False

    def handle_starttag(self, tag, attrs):
        self._in = tag in ("td", "th")
        if self._in:
            self.cells.append("")

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data


def test_html_escapes_user_strings(rendered):
    card, _out, paths = rendered
    page = paths["html"].read_text(encoding="utf-8")
    for raw in ('case<&>"1"', "tumour <&> core", "tiny phantom <data> & 4 cases"):
        assert raw not in page
        assert html.escape(raw, quote=True) in page
    parser = _Cells()
    parser.feed(page)  # the parser unescapes: the original strings come back as cell text
    assert 'case<&>"1"' in parser.cells and "tumour <&> core" in parser.cells and "case|3" in parser.cells
    for a in card["attacks"]:  # the HTML carries the same numbers as the Markdown
        assert _mean_sd(a["mean"][CLASSES[0]], a["sd"][CLASSES[0]]) in parser.cells


def _png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_pngs_are_valid_plausible_images(rendered):
    _card, _out, paths = rendered
    for key in ("dice_vs_eps", "certified_dice_vs_sigma", "examples"):
        rgb = _png(paths[key])
        h, w, _ = rgb.shape
        assert 300 <= w <= 2500 and 250 <= h <= 1500, (key, rgb.shape)
        assert rgb.std() > 10  # not blank
    examples = _png(paths["examples"])
    magenta = np.all(examples == [255, 0, 255], axis=-1)
    assert magenta.sum() > 200  # the abstention ring of the certified panel, plus its legend patch
    dice = _png(paths["dice_vs_eps"])
    assert dice.shape[1] > 1.3 * _png(paths["certified_dice_vs_sigma"]).shape[1]  # one panel per class


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ((), "clean"),
        (("units",), "eps_unit"),
        (("bundle", "inferer"), "roi_size"),
        (("attacks", 4), "sd"),
        (("certification", 1), "certified_radius"),
        (("settings", "certification"), "tau"),
        (("examples",), "sigma"),
    ],
)
def test_missing_key_raises_naming_it_and_writes_nothing(tmp_path, path, key):
    card = make_card()
    node = card
    for p in path:
        node = node[p]
    del node[key]
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        render_card(card, make_examples(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_examples_raise_naming_the_array(tmp_path):
    ex = make_examples()
    del ex["pred_certified"]
    with pytest.raises(ValueError, match="pred_certified"):
        render_card(make_card(), ex, tmp_path)
    ex = make_examples()
    ex["pred_clean"] = ex["pred_clean"].astype(np.float32)
    with pytest.raises(ValueError, match="pred_clean"):
        render_card(make_card(), ex, tmp_path)
    ex = make_examples()
    ex["adversarial"] = ex["adversarial"][:-1]
    with pytest.raises(ValueError, match="shape"):
        render_card(make_card(), ex, tmp_path)
    ex = make_examples()
    ex["label"][0, 0] = -1
    with pytest.raises(ValueError, match="label"):
        render_card(make_card(), ex, tmp_path)
    card = make_card()
    card["schema_version"] = 99
    with pytest.raises(ValueError, match="schema_version"):
        render_card(card, make_examples(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_many_classes_plot_their_mean_and_label_colours():
    from common.reporting import plots

    values = [
        {"a": 0.2, "b": None, "c": 0.6, "d": 0.1, "e": 0.3},
        {"a": None, "b": None, "c": None, "d": None, "e": None},
    ]
    series = plots._class_series(values, list("abcde"))
    assert list(series) == ["mean over classes"]
    np.testing.assert_allclose(series["mean over classes"][0], (0.2 + 0.6 + 0.1 + 0.3) / 4)
    assert np.isnan(series["mean over classes"][1])
    rgb = plots.label_colours(np.array([[0, 1], [-1, 2]]), 3)
    assert rgb[0, 0].tolist() == [0.0, 0.0, 0.0] and rgb[1, 0].tolist() == list(plots.ABSTAIN_COLOUR)
    assert len({tuple(c) for c in rgb.reshape(-1, 3)}) == 4
    assert plots.label_names(3, ["liver", "tumour"], 3) == ["background", "liver", "tumour"]
    assert plots.label_names(5, ["WT", "TC", "ET"], 5) == [f"label {k}" for k in range(5)]


# --------------------------------------------------------------------------------- headless Chromium


def _chromium():
    try:
        return browser_check.find_chromium()
    except FileNotFoundError as err:
        pytest.fail(
            f"{err}. The robustness card's HTML must be checked in a real browser; CI must run "
            f"`{browser_check.APT_COMMAND}`."
        )


def test_missing_chromium_names_the_apt_command(monkeypatch):
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setattr(browser_check.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("apt-get install -y chromium")):
        browser_check.find_chromium()


def test_card_html_opens_in_chromium_without_errors(rendered, tmp_path):
    _chromium()
    _card, _out, paths = rendered
    messages, shot = browser_check.check_page(paths["html"], tmp_path / "card_screenshot.png")
    print(f"\ncard screenshot: {shot}")
    assert browser_check.errors(messages) == [] and messages == []
    rgb = _png(shot)
    assert rgb.shape[1] == 1200 and rgb.shape[0] > 2000  # the whole page, tables and three figures
    assert rgb.std() > 10 and (rgb < 100).mean() > 0.01  # text and figures drawn on the white page


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('<script>console.error("x-injected")</script>', "x-injected"),
        ('<img src="nonexistent.png" alt="">', "ERR_FILE_NOT_FOUND"),
        ('<script>throw new Error("boom-injected")</script>', "boom-injected"),
    ],
)
def test_browser_check_catches_injected_errors(tmp_path, body, expected):
    _chromium()
    page = tmp_path / "bad.html"
    page.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body><p>x</p>{body}</body></html>"
    )
    messages, shot = browser_check.check_page(page, tmp_path / "bad.png", full_page=False)
    bad = browser_check.errors(messages)
    assert bad and any(expected in m.text for m in bad), messages
    assert _png(shot).shape[:2] == (900, 1200)


def test_card_csp_blocks_an_injected_script(rendered, tmp_path):
    _chromium()
    _card, _out, paths = rendered
    page = (
        paths["html"]
        .read_text(encoding="utf-8")
        .replace("</body>", "<script>console.log('ran')</script></body>")
    )
    tampered = tmp_path / "tampered.html"
    tampered.write_text(page, encoding="utf-8")
    messages, _ = browser_check.check_page(tampered, tmp_path / "t.png", full_page=False)
    assert not any(m.text == "ran" for m in messages)  # the script never ran ...
    assert any(
        "Content Security Policy" in m.text for m in browser_check.errors(messages)
    )  # ... and it shows


def test_schema_only_card_renders_without_the_optional_keys(tmp_path):
    """The runner's extra keys (command, σ units, clean sd, cache) are optional: SCHEMA.md alone renders."""
    card = make_card()
    for key in ("command", "cache"):
        del card[key]
    del card["units"]["sigma_unit"], card["units"]["sigma_input_units"], card["clean"]["sd"]
    for r in card["certification"]:
        del r["sigma_input_units"]
    card["cost"]["parts"]["fgsm_dice"]["ratio_to_forward"] = None
    paths = render_card(card, make_examples(), tmp_path)
    tables = _md_tables(paths["md"].read_text(encoding="utf-8"))
    assert _table_with(tables, "Class")[1] == ["liver", _dice(card["clean"]["mean"]["liver"])]
    cert = _table_with(tables, "σ (network-input units)")
    assert [row[0] for row in cert[1:]] == [_g4(s) for s in SIGMAS] and len(cert[0]) == 5
    assert _table_with(tables, "Part")[2] == [
        "fgsm_dice",
        _g4(card["cost"]["parts"]["fgsm_dice"]["s_per_case"]),
        "–",
    ]
    assert "Command:" not in paths["md"].read_text(encoding="utf-8")
