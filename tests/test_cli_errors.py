"""One error convention for every command-line tool (issue #16 item 10): bad input prints exactly one
stderr line ``error: <what>, <file or argument>`` and exits with status 2; ``--debug`` adds the traceback.
Refused before any work: unknown flags and override ids, ε / σ outside (0, 1] (fractions of the input
range), ``--device cuda`` without CUDA.

In-process runs of :func:`scripts.cli.run` on real ``main`` functions, a check that every ``scripts/``
module with a ``__main__`` block goes through it, and one real subprocess.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from bundle_run import BUNDLES, REPO
from scripts import cli, make_phantoms


def _run(capsys, main, argv, **kwargs) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        cli.run(main, argv, **kwargs)
    return info.value.code, capsys.readouterr().err.splitlines()


def _card_like(bundle_root: str, datalist: str, config: str = "inference.json", eps=(0.01,), sigmas=(0.25,),
               device: str = "cpu", overrides=None) -> str:
    """The robustness card's argument names; reached only when every check passed."""
    raise AssertionError("main ran although its arguments are bad")


CARD = ["--bundle_root", str(BUNDLES / "nlcen_lung"), "--datalist", "x.json"]
RANGES = {"eps": (0.0, 1.0), "sigmas": (0.0, 1.0)}


@pytest.mark.parametrize("argv, named", [
    (["--eps", "[100]"], "eps: 100 is out of range"),
    (["--eps", "[0.01,-0.1]"], "eps: -0.1 is out of range"),
    (["--sigmas", "[0.25,3]"], "sigmas: 3 is out of range"),
    (["--overrides", '{"no_such_id": 1}'], "overrides: the bundle config"),
    (["--overrides", "{not json"], "overrides: expected a JSON object"),
    (["--device", "tpu:0"], "device: not a device, 'tpu:0'"),
    (["--frobnicate", "3"], "unknown argument --frobnicate"),
])
def test_bad_arguments_one_line_exit_2(capsys, argv, named):
    code, err = _run(capsys, _card_like, CARD + argv, ranges=RANGES)
    assert code == cli.EXIT_BAD_INPUT and len(err) == 1
    assert err[0].startswith("error: ") and named in err[0]


def test_unknown_override_names_id_and_config_known_ones_pass(capsys):
    code, err = _run(capsys, _card_like, CARD + ["--overrides", '{"image_size": [64, 64], "imge_size": 3}'])
    assert code == 2 and err == [f"error: overrides: the bundle config {BUNDLES / 'nlcen_lung' / 'configs' / 'inference.json'} "
                                 "has no id 'imge_size'"]
    seen = {}
    cli.run(lambda bundle_root, datalist, overrides=None: seen.update(overrides=overrides),
            CARD + ["--overrides", '{"image_size": [64, 64], "network_def#new_argument": 1}'])
    assert seen["overrides"] == {"image_size": [64, 64], "network_def#new_argument": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_refused(capsys):
    code, err = _run(capsys, _card_like, CARD + ["--device", "cuda"])
    assert code == 2 and err == ["error: device: 'cuda' asked for, but CUDA is not available on this machine "
                                 "(use --device cpu)"]


def test_error_raised_by_main_and_debug_traceback(capsys, tmp_path):
    code, err = _run(capsys, make_phantoms.main, ["nope", str(tmp_path)])
    assert code == 2 and err == ["error: kind: expected one of ['abdomen', 'brain', 'chest', 'skin'], got 'nope'"]
    code, err = _run(capsys, make_phantoms.main, ["nope", str(tmp_path), "--debug"])
    assert code == 2 and err[0] == "Traceback (most recent call last):" and len(err) > 3
    assert err[-1].startswith("error: kind:") and any(line.startswith("ValueError: kind") for line in err)


def test_fire_usage_errors_are_one_line(capsys, tmp_path):
    code, err = _run(capsys, make_phantoms.main, [])  # required argument missing: fire's own complaint
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "kind" in err[0]
    code, err = _run(capsys, make_phantoms.main, ["chest", str(tmp_path), "8", "1", "0", "nifti", "False", "x", "y"])
    assert code == 2 and err == ["error: unexpected argument 'y' (see --help)"]
    assert not (tmp_path / "datalist.json").exists()  # refused before any work


def test_argparse_main_one_line(capsys):
    from scripts import monai_label_infer

    code, err = _run(capsys, monai_label_infer.main, ["--image", "x.nii.gz"], parses_argv=True)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: the following arguments are required")
    code, err = _run(capsys, monai_label_infer.main, ["--bundle_dir", "b", "--image", "x", "--output", "o",
                                                      "--device", "tpu"], parses_argv=True)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: device: not a device, 'tpu'")


def test_every_script_main_block_uses_the_convention():
    scripts = sorted((REPO / "scripts").glob("*.py"))
    with_main = []
    for path in scripts:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                with_main.append(path.name)
                calls = [ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)]
                assert "run" in calls, f"{path.name}: __main__ does not call scripts.cli.run"
                assert not any(c.startswith("fire.") for c in calls), f"{path.name}: bypasses scripts.cli.run"
    assert len(with_main) >= 15


def test_real_command_line(tmp_path):
    """``python -m scripts.robustness_card --eps "[100]"``: one line on stderr (no third-party warning),
    status 2, before anything is read."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "scripts.robustness_card", *CARD, "--eps", "[100]", "--output_dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["error: eps: 100 is out of range, expected values in (0, 1]"]
    assert not (tmp_path / "o").exists()


def test_fire_shortcuts_negative_values_and_bool_flags_still_work(tmp_path):
    seen = {}

    def main(alpha: float = 0.1, num_cases: int = 1, lesion: bool = False, offset: float = 0.0):
        seen.update(alpha=alpha, num_cases=num_cases, lesion=lesion, offset=offset)

    cli.run(main, ["-a", "0.5", "--num-cases=3", "--lesion", "--offset", "-0.25"])
    assert seen == {"alpha": 0.5, "num_cases": 3, "lesion": True, "offset": -0.25}
    cli.run(main, ["0.2", "4", "--nolesion"])
    assert seen == {"alpha": 0.2, "num_cases": 4, "lesion": False, "offset": 0.0}
