"""The demo (README command (a)) end to end at a tiny size: bundle runs, report, and the robustness card."""

from __future__ import annotations

import json
from pathlib import Path

from scripts import demo


def test_demo_trains_attacks_reports_and_writes_the_card(tmp_path):
    out = tmp_path / "demo"
    report = Path(demo.main(output_dir=str(out), variants="nlcen", phantom_cases=10, image_size=64,
                            max_epochs=1, eps_pixels=(8,)))
    text = report.read_text(encoding="utf-8")
    summary = json.loads((out / "eval" / "nlcen" / "attack" / "summary.json").read_text(encoding="utf-8"))
    attacked = [e for e in summary["entries"] if e["attack"] == "targeted_ifgsm"]
    assert len(attacked) == 1 and f"| nlcen | targeted_ifgsm | {attacked[0]['eps_display']:.3f} |" in text
    assert (out / "dice_vs_eps.png").stat().st_size > 1000
    # the card reads the bundle's own inference.json with the demo's weights and merges the organ labels
    card = json.loads((out / "card" / "card.json").read_text(encoding="utf-8"))
    assert "[card/card.html](card/card.html)" in text and (out / "card" / "card.html").is_file()
    assert card["settings"]["label_values"] == demo.CARD_LABEL_VALUES
    assert Path(card["bundle"]["checkpoint"]) == (out / "models" / "nlcen" / "model.pt").resolve()
    assert card["bundle"]["class_names"] == ["lung"] and 0.0 <= card["clean"]["mean"]["lung"] <= 1.0
    test_cases = json.loads((out / "data" / "datalist.json").read_text(encoding="utf-8"))["test"]
    assert card["data"]["section"] == "test" and len(card["data"]["case_ids"]) == len(test_cases)
