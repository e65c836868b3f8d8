"""Config compositions as ``python -m monai.bundle run --config_file "[...]"`` reads them (MONAI
``ConfigParser.read_config`` with a list of files): order-independence of the BraTS 2D defences, the NLCEN
ablation protocol's folders, and every command of every bundle README's experiment table parsed with all
its references resolvable. Nothing is trained or loaded here."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"


def _parser(bundle: str, files, overrides: dict | None = None) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f) for f in files])
    parser["bundle_root"] = "."
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def _unresolvable(parser: ConfigParser) -> list[str]:
    """Every ``@id`` in the composed config (after macros and relative ids) that names no config item."""
    parser.parse()
    refs = ReferenceResolver.find_refs_in_config(parser.get(), id="")
    return sorted(r for r in refs if r not in parser)


# ------------------------------------------------------------------------------------- BraTS 2D defences
# Liu et al., J. Digit. Imaging 2021: 3D-UNet Adam 1e-4, 100 epochs; distillation (and adversarial training,
# "the same hyperparameters as in the distillation method") 400 epochs, 5e-4; the 2D-UNet "a different
# learning rate of 1e-5 throughout all experiments", 400 epochs.
BRATS = {  # defence files -> (3D run name, 3D lr, 3D epochs, 2D run name)
    (): ("unet3d", 1e-4, 100, "unet2d"),
    ("distill.json",): ("distill_T100", 5e-4, 400, "unet2d_distill_T100"),
    ("adv_train.json",): ("adv_train_eps0.05", 5e-4, 400, "unet2d_adv_train_eps0.05"),
    ("adv_train.json", "adv_train_short.json"): ("adv_train_eps0.05_e100_lr1e-4", 1e-4, 100, "unet2d_adv_train_eps0.05"),
    ("adv_train.json", "adv_train_sequential.json"): ("adv_train_eps0.05_seq", 5e-4, 400, "unet2d_adv_train_eps0.05_seq"),
    ("noise_aug.json",): ("noise_aug", 1e-4, 100, "unet2d_noise_aug"),
    ("noise_aug.json", "noise_aug_sequential.json"): ("noise_aug_seq", 1e-4, 100, "unet2d_noise_aug_seq"),
}


@pytest.mark.parametrize("defence", list(BRATS), ids=lambda d: "+".join(d) or "plain")
def test_brats_2d_defences_compose_in_any_order(defence):
    run3d, lr3d, epochs3d, run2d = BRATS[defence]
    p = _parser("unet3d_brats_distill", ["train.json", *defence])
    assert (p.get_parsed_content("learning_rate"), p.get_parsed_content("max_epochs")) == (lr3d, epochs3d)
    assert p.get_parsed_content("network_def#spatial_dims") == 3
    assert p.get_parsed_content("ckpt_dir") == f"./models/{run3d}"
    assert p.get_parsed_content("output_dir") == f"./eval/{run3d}"
    folders = set()
    for order in (["train_2d.json", *defence], [*defence, "train_2d.json"]):
        p = _parser("unet3d_brats_distill", ["train.json", *order])
        assert p.get_parsed_content("learning_rate") == 1e-5
        assert p.get_parsed_content("max_epochs") == 400
        assert p.get_parsed_content("batch_size") == 64
        assert p.get_parsed_content("network_def#spatial_dims") == 2
        folders.add((p.get_parsed_content("ckpt_dir"), p.get_parsed_content("output_dir")))
        if "distill.json" in defence:  # the teacher is 2D too and lives in the variant's own folder
            assert p.get_parsed_content("teacher#ckpt_dir") == f"./models/{run2d}/teacher"
    assert folders == {(f"./models/{run2d}", f"./eval/{run2d}")}


def test_brats_every_variant_has_its_own_folders():
    names = [v[0] for v in BRATS.values()] + [v[3] for v in BRATS.values()]
    # the 2D short variant trains with the 2D values (lr 1e-5, 400 epochs) and so is the 2D run itself
    assert len(set(names)) == len(names) - 1


# ------------------------------------------------------------- certification: Table 1's other segmenters
@pytest.mark.parametrize("net, target", [("resunetpp.json", "ResUNetPlusPlus"), ("deeplabv2.json", "DeepLabV2")])
@pytest.mark.parametrize("variant", [[], ["train_noise.json"]], ids=["base", "noise"])
def test_certified_seg_networks_have_their_own_folders_in_any_order(net, target, variant):
    """Laousy et al., MICCAI 2023, Table 1: UNet, ResUNet++ and DeepLabV2 each trained (plain and with
    noise) and certified from its own ``models/`` and ``eval/`` folder, whatever the order of the files."""
    name, run = net[: -len(".json")], "noise" if variant else "base"
    for files in ([net, *variant, "certify.json", "jsrt.json"], ["jsrt.json", "certify.json", *variant, net],
                  [*variant, net]):
        p = _parser("certified_seg", ["train.json", *files])
        assert p.get("network_def#_target_") == f"common.networks.{target}"
        dataset = "jsrt" if "jsrt.json" in files else "chest"
        assert p.get_parsed_content("ckpt_dir") == f"./models/{dataset}/{name}/{run}"
        assert p.get_parsed_content("output_dir") == f"./eval/{dataset}/{name}/{run}"
        assert not _unresolvable(p)
    # the demo, before or after the network's file; inference writes below the same folders
    for files in (["demo.json", net], [net, "demo.json"]):
        p = _parser("certified_seg", ["train.json", *variant, *files])
        assert p.get("network_def#_target_") == f"common.networks.{target}"
        assert p.get_parsed_content("ckpt_dir") == f"./demo/models/chest/{name}/{run}"
        assert p.get_parsed_content("output_dir") == f"./demo/eval/chest/{name}/{run}"
    for files, root in ((["inference.json", net], "."), (["inference.json", "inference_demo.json", net], "./demo")):
        p = _parser("certified_seg", files)
        assert p.get_parsed_content("output_dir") == f"{root}/eval/chest/{name}/base/inference"


# ------------------------------------------------------------------------------------ NLCEN ablation
@pytest.mark.parametrize("files, seed, folder", [
    (["ablation_base.json"], 0, "ablation/seed0/no_nlce"),
    (["no_nl.json", "ablation_finetune.json"], 3, "ablation/seed3/frozen/no_nl"),
    (["ablation_finetune.json", "no_ce.json"], 3, "ablation/seed3/frozen/no_ce"),
    (["ablation_finetune.json"], 1, "ablation/seed1/frozen/nlcen"),
    (["ablation_unfreeze.json"], 1, "ablation/seed1/unfrozen/nlcen"),
    (["no_nl.json"], 0, "no_nl"),
])
def test_nlcen_ablation_stages_and_seeds(files, seed, folder):
    """He et al., AAAI 2019: w/o NLCE first, then w/o NL / w/o CE / NLCEN fine-tuned from it with its
    layers frozen, then NLCEN unfrozen; each seed and stage in its own folder, initialised from the stage
    before it of the same seed."""
    for demo in ([], ["demo.json"]):
        p = _parser("nlcen_lung", ["train.json", *files, *demo], {"seed": seed})
        root = "./demo/models/" if demo else "./models/"
        assert p.get_parsed_content("ckpt_dir") == root + folder
        assert p.get_parsed_content("output_dir") == root.replace("models", "eval") + folder
        if "ablation_finetune.json" in files:
            assert p.get_parsed_content("ablation_init") == root + f"ablation/seed{seed}/no_nlce/model.pt"
        if "ablation_unfreeze.json" in files:
            assert p.get_parsed_content("ablation_init") == root + f"ablation/seed{seed}/frozen/nlcen/model.pt"
        assert not _unresolvable(p)


# ---------------------------------------------------------------------------- README experiment tables
def _experiment_rows(bundle: str) -> list[tuple[str, str]]:
    """(experiment, command) rows of the table under the README's "## Paper experiments" heading."""
    text = (BUNDLES / bundle / "docs" / "README.md").read_text()
    section = text.split("## Paper experiments", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and not set(cells[0]) <= {"-", " "} and cells[0] != "experiment":
            commands = [c for c in re.findall(r"`([^`]+)`", cells[1]) if c.startswith(("$RUN ", "$PY "))]
            assert commands, f"{bundle}: experiment {cells[0]!r} without a command"
            rows.extend((cells[0], cmd) for cmd in commands)
    return rows


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


EXPERIMENT_BUNDLES = ["nlcen_lung", "unet3d_brats_distill", "resdsn_c2f_pancreas", "unet_advaug", "certified_seg"]


@pytest.mark.parametrize("bundle", EXPERIMENT_BUNDLES)
def test_every_documented_experiment_command_parses(bundle):
    rows = _experiment_rows(bundle)
    assert len(rows) >= 3, f"{bundle}: no experiment table"
    for experiment, command in rows:
        argv = shlex.split(command.replace("$RUN", "RUN").replace("$PY", "PY"))
        if argv[0] == "PY":  # a repository script: it must exist (run from the repository root)
            assert argv[1] == "-m", command
            assert (ROOT / (argv[2].replace(".", "/") + ".py")).is_file(), f"{experiment}: {command}"
            continue
        assert argv[0] == "RUN" and argv[1] == "--config_file", f"{experiment}: {command}"
        files = [Path(f).name for f in ast.literal_eval(argv[2])]
        overrides = {k.lstrip("-"): _literal(v) for k, v in zip(argv[3::2], argv[4::2])}
        p = _parser(bundle, files, overrides)
        missing = _unresolvable(p)
        assert not missing, f"{experiment}: {command}: unresolvable {missing}"
        for key in ("ckpt_dir", "output_dir"):
            if key in p:
                assert isinstance(p.get_parsed_content(key), str), f"{experiment}: {key}"
