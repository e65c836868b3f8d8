"""scripts.reproduce: the generated README sections and metadata agree with the committed results.json,
the section rewrite touches nothing else, and bad arguments fail with one line before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.studies import STUDIES
from common.studies.report import BEGIN, END, render_section, replace_section, robustness_results

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
WITH_RESULTS = [b for b in STUDIES if (BUNDLES / b / "docs" / "results.json").is_file()]
REQUIRED = {"clean_dice", "findings", "seconds", "settings", "command", "commit", "date", "mode", "tables"}


def test_some_bundle_has_committed_results():
    assert WITH_RESULTS, "no bundles/*/docs/results.json committed"


@pytest.mark.parametrize("bundle", WITH_RESULTS)
def test_readme_section_and_metadata_match_results_json(bundle):
    docs = BUNDLES / bundle / "docs"
    results = json.loads((docs / "results.json").read_text())
    assert REQUIRED <= set(results), sorted(REQUIRED - set(results))
    assert results["findings"] and all({"claim", "holds", "evidence"} <= set(f) for f in results["findings"])
    assert all(f["holds"] in (True, False, None) for f in results["findings"])
    readme = (docs / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1, f"{bundle}: README needs exactly one generated section"
    section = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert section == render_section(results), (
        f"{bundle}: docs/README.md's generated section differs from docs/results.json; "
        f"run python -m scripts.reproduce {bundle} --docs_only")
    for plot in results.get("plots", []):
        assert (docs / plot).is_file(), f"{bundle}: plot {plot} named in results.json is missing from docs/"
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    assert meta["robustness_results"] == robustness_results(results)


def test_replace_section_rewrites_only_between_markers():
    readme = f"# T\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## Later\nkept\n"
    out = replace_section(readme, f"{BEGIN}\nnew\n{END}")
    assert out == f"# T\n\nintro\n\n{BEGIN}\nnew\n{END}\n\n## Later\nkept\n"
    appended = replace_section("# T\n", f"{BEGIN}\nx\n{END}", heading="## Gen")
    assert appended == f"# T\n\n## Gen\n\n{BEGIN}\nx\n{END}\n"


def test_render_section_states_each_finding_and_its_verdict():
    results = {
        "command": "python -m scripts.reproduce x --quick", "mode": "quick", "date": "d", "commit": "c",
        "seconds": 1.0, "settings": {"data": "phantoms"}, "clean_dice": {"lung": 0.9},
        "findings": [{"claim": "A (B et al. 2020)", "holds": False, "evidence": "0.1 vs 0.2, p = 0.5, n = 8"},
                     {"claim": "C", "holds": None, "evidence": "e"}],
        "tables": [{"title": "T", "header": ["a", "b"], "rows": [["m", 0.12345]]}], "plots": ["p.png"],
    }
    text = render_section(results)
    assert "1. **does not hold** — A (B et al. 2020)" in text and "0.1 vs 0.2, p = 0.5, n = 8" in text
    assert "2. **not testable here** — C" in text
    assert "| m | 0.123 |" in text and "![p.png](p.png)" in text and "| 0.900 |" in text


@pytest.mark.parametrize("args, message", [
    (["nope"], "bundle: expected one of"),
    (["nlcen_lung", "--seed", "-1"], "seed: expected an integer >= 0"),
    (["nlcen_lung", "--quick", "maybe"], "quick: expected a flag"),
])
def test_bad_arguments_fail_with_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.reproduce", *args, "--out_dir", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "stack size" not in ln]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_set_top_level_key_changes_that_key_only():
    from common.studies.report import set_top_level_key

    text = '{\n    "a": [1, 2],\n    "robustness_results": {"old": 1},\n    "z": {"robustness_results": 3}\n}\n'
    out = set_top_level_key(text, "robustness_results", {"new": [1]})
    assert out == ('{\n    "a": [1, 2],\n    "robustness_results": {\n        "new": [\n            1\n        ]\n    },\n'
                   '    "z": {"robustness_results": 3}\n}\n')
    assert set_top_level_key('{\n    "a": 1\n}\n', "k", 2) == '{\n    "a": 1,\n    "k": 2\n}\n'
