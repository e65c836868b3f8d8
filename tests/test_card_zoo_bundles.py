"""The robustness card reads model-zoo segmentation bundles as their authors write them (issue #15).

Each test writes a bundle in the style of one of the model zoo's (configs with the zoo's keys, written
here, no project imports; tiny networks with random weights saved into ``models/``; two small cases)
and checks what :func:`common.card.bundle_reader.read_bundle` and :mod:`common.card.cases` make of it:

- the forward equals the bundle's own pipeline run directly: the config parsed by MONAI's
  ``ConfigParser`` alone, the checkpoint loaded by hand, ``inferer(x, network)`` (oracle);
- its input gradient is the gradient through that same call (autograd through MONAI's inferer);
- the cases' labels have the network output's layout and equal the label prepared the way the zoo's
  own ``train.json`` prepares it (both keys written out, ``"nearest"`` for the label) or, for BraTS, MONAI's
  ``ConvertToMultiChannelBasedOnBratsClasses`` (TC, WT, ET).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from PIL import Image

from common.card.bundle_reader import check_forward, read_bundle
from common.card.cases import read_case, read_datalist

DEVICE = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
TINY_UNET = {"channels": [4, 8], "strides": [2], "num_res_units": 1}


# ------------------------------------------------------------------------------------------ writers
def _metadata(channel_def: dict[str, str], in_channels: int = 1) -> dict:
    return {
        "version": "0.1.0",
        "name": "tiny zoo-style bundle",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": in_channels}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(channel_def),
                                 "channel_def": channel_def}},
        },
    }


def _write_bundle(root: Path, config: dict, meta: dict, net: torch.nn.Module, layout: str,
                  config_name: str = "inference.json") -> dict[str, torch.Tensor]:
    """Write configs/, and random weights as ``layout`` ('bare', 'model', 'state_dict') in models/model.pt."""
    (root / "configs").mkdir(parents=True)
    text = yaml.safe_dump(config, sort_keys=False) if config_name.endswith(".yaml") else json.dumps(config, indent=1)
    (root / "configs" / config_name).write_text(text)
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    (root / "models").mkdir()
    torch.save(state if layout == "bare" else {layout: state, "epoch": 3}, root / "models" / "model.pt")
    return state


def _nifti(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def _blob(shape, seed: int, values=(1,)) -> np.ndarray:
    """Nested ellipsoids: label values[0] outside-most, the last one inside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    centre = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, len(shape))
    label = np.zeros(shape, np.uint8)
    for k, v in enumerate(values):
        radii = np.array(shape) * (0.35 - 0.1 * k)
        label[(((grid - centre) / radii) ** 2).sum(-1) <= 1] = v
    return label


def _datalist(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"testing": [], "test": entries}))
    return path


# ------------------------------------------------------------------------------------------- oracle
@contextlib.contextmanager
def _fresh_process_imports(root: Path):
    """Imports as in a fresh ``python -m monai.bundle run`` of the bundle: its root on ``sys.path`` and no
    ``scripts`` package imported yet (this project has its own); restored afterwards."""
    saved = {n: m for n, m in sys.modules.items() if n == "scripts" or n.startswith("scripts.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def _oracle(root: Path, config_name: str, state: dict) -> tuple[torch.nn.Module, object]:
    """The bundle's network and inferer as MONAI alone builds them from the config, weights loaded by hand."""
    with _fresh_process_imports(root):
        parser = ConfigParser()
        parser.read_config(str(root / "configs" / config_name))
        parser["bundle_root"] = str(root)
        net = parser.get_parsed_content("network_def")
        inferer = parser.get_parsed_content("inferer")
    net.load_state_dict(state)
    return net.eval(), inferer


def _check_forward_and_gradient(bundle, x: torch.Tensor, net, inferer) -> None:
    """forward(x) == inferer(x, net) and d<w, forward>/dx == d<w, inferer(x, net)>/dx."""
    xa = x.detach().clone().double().requires_grad_(True)
    xb = x.detach().clone().double().requires_grad_(True)
    bundle.network.double()
    net.double()
    try:
        out = bundle.forward(xa)
        ref = inferer(xb, net)
        assert out.shape == ref.shape == (1, bundle.num_classes, *x.shape[2:])
        torch.testing.assert_close(out, ref.as_subclass(torch.Tensor), rtol=1e-10, atol=1e-10)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        (out * w).sum().backward()
        (ref * w).sum().backward()
        assert xa.grad.abs().max() > 0
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-10)
    finally:
        bundle.network.float()
    check_forward(bundle, x, "case 0")


# --------------------------------------------------------------------------------------------- tests
def _spleen_config(root: Path) -> dict:
    """models/spleen_ct_segmentation/configs/inference.json with a tiny UNet and a 16³ window."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.float32",
        "output_postfix": "trans",
        "separate_folder": True,
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": DEVICE,
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, **TINY_UNET,
                        "norm": "batch"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0,
             "b_max": 1, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 4},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 4,
                    "overlap": 0.5, "sw_device": "@device", "device": "@device"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
             "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
             "separate_folder": "@separate_folder"},
        ]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def _label_as_trained(image: str, label: str, transforms: list[dict]) -> torch.Tensor:
    """The label through the zoo's train.json style preprocessing (both keys written out)."""
    from monai.transforms import Compose
    from monai.bundle import ConfigParser as Parser

    p = Parser({"pre": {"_target_": "Compose", "transforms": transforms}})
    pre = p.get_parsed_content("pre")
    assert isinstance(pre, Compose)
    return torch.as_tensor(pre({"image": image, "label": label})["label"]).as_subclass(torch.Tensor)


def test_spleen_like_sliding_window_bundle(tmp_path):
    from monai.networks.nets import UNet

    root = tmp_path / "spleen_ct_segmentation"
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, **TINY_UNET, norm="batch")
    state = _write_bundle(root, _spleen_config(root), _metadata({"0": "background", "1": "spleen"}), net, "bare")
    entries = []
    for i in range(2):
        label = _blob((22, 20, 12), i)
        image = np.where(label > 0, 110.0, -30.0) + np.random.default_rng(i).normal(0, 20, label.shape)
        entries.append({"image": _nifti(tmp_path / f"img{i}.nii.gz", image.astype(np.float32), (1.0, 1.2, 2.5)),
                        "label": _nifti(tmp_path / f"lab{i}.nii.gz", label, (1.0, 1.2, 2.5))})
    bundle = read_bundle(root)
    assert (bundle.output, bundle.output_source.split(" (")[1]) == ("softmax", "softmax=True)")
    assert bundle.foreground_names == ["spleen"] and bundle.checkpoint_sha256
    assert bundle.inferer["type"] == "SlidingWindowInferer" and bundle.inferer["overlap"] == 0.5
    cases, section = read_datalist(_datalist(tmp_path / "datalist.json", entries))
    assert section == "test" and [c.case_id for c in cases] == ["img0", "img1"]
    net_o, inferer_o = _oracle(root, "inference.json", state)
    trained = [{"_target_": "LoadImaged", "keys": ["image", "label"]},
               {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
               {"_target_": "Orientationd", "keys": ["image", "label"], "axcodes": "RAS"},
               {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [1.5, 1.5, 2.0],
                "mode": ["bilinear", "nearest"]}]
    for case, entry in zip(cases, entries):
        data = read_case(bundle, case)
        assert data.y.shape == (1, 1, *data.x.shape[2:]) and data.y.dtype == torch.int64
        assert data.spacing == pytest.approx((1.5, 1.5, 2.0))
        torch.testing.assert_close(data.y[0], _label_as_trained(entry["image"], entry["label"], trained).long())
        assert set(torch.unique(data.y).tolist()) == {0, 1}
    _check_forward_and_gradient(bundle, data.x, net_o, inferer_o)
    # windows named for another device in the config run and stitch on the card's device, with a note
    moved = read_bundle(root, overrides={"inferer#sw_device": "cuda:0", "inferer#device": "cuda:0"})
    assert any("sw_device=cuda:0, device=cuda:0; the card runs and stitches the windows on cpu" in n
               for n in moved.notes)
    with torch.no_grad():
        torch.testing.assert_close(moved.forward(data.x), inferer_o(data.x.double(), net_o).float())


def _brats_config() -> dict:
    """models/brats_mri_segmentation/configs/inference.json with a tiny SegResNet and a 16³ window."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "data_list_file_path": "$@bundle_root + '/configs/datalist.json'",
        "dataset_dir": "/workspace/data/medical/brats2018challenge",
        "test_datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='testing', "
                         "base_dir=@dataset_dir)",
        "device": DEVICE,
        "amp": True,
        "network_def": {"_target_": "SegResNet", "blocks_down": [1, 1], "blocks_up": [1], "init_filters": 8,
                        "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@test_datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": True,
                       "num_workers": 4},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 1,
                    "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "meta_keys": "pred_meta_dict", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: torch.where(x[[2]] > 0, 4, "
             "torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))"},
            {"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict", "output_dir": "@output_dir",
             "output_postfix": "seg", "output_dtype": "uint8", "resample": False, "squeeze_end_dims": True},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "evaluating": ["$setattr(torch.backends.cudnn, 'benchmark', True)", "$@evaluator.run()"],
    }


def _brats_bundle(tmp_path: Path) -> tuple[Path, Path, dict]:
    from monai.networks.nets import SegResNet

    root = tmp_path / "brats_mri_segmentation"
    torch.manual_seed(1)
    net = SegResNet(blocks_down=[1, 1], blocks_up=[1], init_filters=8, in_channels=4, out_channels=3,
                    dropout_prob=0.2)
    meta = _metadata({"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}, in_channels=4)
    state = _write_bundle(root, _brats_config(), meta, net, "model")
    entries = []
    for i in range(2):
        label = _blob((20, 18, 16), 10 + i, values=(2, 1, 4))  # oedema around a core with enhancing centre
        case = tmp_path / f"Brats18_case_{i}"
        images = [_nifti(case / f"Brats18_case_{i}_{m}.nii.gz",
                         (label * (j + 1) * 30.0 + np.random.default_rng(j + 4 * i).normal(100, 10, label.shape)
                          ).astype(np.float32))
                  for j, m in enumerate(("t1ce", "t1", "t2", "flair"))]
        entries.append({"label": _nifti(case / f"Brats18_case_{i}_seg.nii.gz", label), "image": images})
    return root, _datalist(tmp_path / "datalist.json", entries), state


def test_brats_like_sigmoid_bundle_with_overlapping_regions(tmp_path):
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    root, datalist, state = _brats_bundle(tmp_path)
    bundle = read_bundle(root, label_values=[[1, 4], [1, 2, 4], [4]])
    assert bundle.output == "sigmoid" and "Activationsd" in bundle.output_source
    assert bundle.channel_labels == ((1, 4), (1, 2, 4), (4,))
    assert bundle.foreground_names == ["Tumor core", "Whole tumor", "Enhancing tumor"]
    assert bundle.input_range.measured and bundle.input_range.clip is None  # z-units
    cases, _ = read_datalist(datalist)
    assert len(cases[0].images) == 4 and cases[0].files[-1] == cases[0].label
    for case in cases:
        data = read_case(bundle, case)
        assert data.x.shape == (1, 4, 20, 18, 16) and data.y.shape == (1, 3, 20, 18, 16)
        raw = torch.as_tensor(nib.load(str(case.label)).get_fdata())
        expected = ConvertToMultiChannelBasedOnBratsClasses()(raw).long()
        torch.testing.assert_close(data.y[0].cpu(), expected)
        assert all(data.y[0, c].any() for c in range(3))
    net_o, inferer_o = _oracle(root, "inference.json", state)
    _check_forward_and_gradient(bundle, data.x, net_o, inferer_o)
    # the same label values are refused for a softmax reading, which needs disjoint values
    with pytest.raises(ValueError, match="label_values: expected disjoint values with softmax"):
        read_bundle(root, label_values=[[1, 4], [1, 2, 4], [4]], output="softmax")
    forced = read_bundle(root, label_values=[1, 2, 4], output="softmax")
    assert forced.output_source.startswith("option (the config says sigmoid: postprocessing Activationsd")


def _slice_config() -> dict:
    """models/ventricular_short_axis_3label/configs/inference.json with a tiny 2D UNet."""
    return {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "device": DEVICE,
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "/workspace/data",
        "output_dir": "./output",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 4, **TINY_UNET},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": False},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "ScaleIntensityd", "keys": "image"},
            {"_target_": "EnsureTyped", "keys": "image", "device": "@device"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SliceInferer", "roi_size": [16, 16], "spatial_dim": 2},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict", "output_dir": "@output_dir"},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"}}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "evaluating": ["$@evaluator.run()"],
    }


def _slice_bundle(tmp_path: Path) -> tuple[Path, Path, dict]:
    from monai.networks.nets import UNet

    root = tmp_path / "ventricular_short_axis_3label"
    torch.manual_seed(2)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=4, **TINY_UNET)
    meta = _metadata({"0": "background", "1": "left ventricle", "2": "myocardium", "3": "right ventricle"})
    state = _write_bundle(root, _slice_config(), meta, net, "model")
    entries = []
    for i in range(2):
        label = _blob((18, 16, 5), 20 + i, values=(3, 2, 1))
        image = label * 40.0 + np.random.default_rng(i).normal(50, 5, label.shape)
        entries.append({"image": _nifti(tmp_path / f"sax_{i}.nii.gz", image.astype(np.float32)),
                        "label": _nifti(tmp_path / f"sax_{i}_seg.nii.gz", label)})
    return root, _datalist(tmp_path / "datalist.json", entries), state


def test_slice_inferer_bundle_runs_the_2d_network_on_every_slice(tmp_path):
    root, datalist, state = _slice_bundle(tmp_path)
    bundle = read_bundle(root)
    assert bundle.inferer["type"] == "SliceInferer" and bundle.inferer["slice_dim"] == 2
    assert bundle.inferer["roi_size"] == [16, 16] and bundle.output == "softmax"
    cases, _ = read_datalist(datalist)
    for case in cases:
        data = read_case(bundle, case)
        raw = np.asarray(nib.load(str(case.label)).dataobj)
        assert data.x.shape == data.y.shape == (1, 1, 18, 16, 5)
        np.testing.assert_array_equal(data.y[0, 0].cpu().numpy(), raw)
    net_o, inferer_o = _oracle(root, "inference.json", state)
    _check_forward_and_gradient(bundle, data.x, net_o, inferer_o)
    # a slice of the forward is MONAI's 2D sliding window (16 x 16 windows on the 18 x 16 plane) on that slice
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        whole = bundle.forward(data.x)
        one = sliding_window_inference(data.x[..., 3], [16, 16], 1, net_o.float(), overlap=0.25)
    torch.testing.assert_close(whole[..., 3], one, rtol=1e-5, atol=1e-6)


def _endoscopy_config() -> dict:
    """models/endoscopic_tool_segmentation/configs/inference.json with a small RGB UNet for FlexibleUNet."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/endoscopic_tool_dataset",
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir,'test', '*', '*[!seg].jpg'))))",
        "device": DEVICE,
        "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 3, "out_channels": 2, **TINY_UNET},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": -1},
            {"_target_": "Resized", "keys": ["image"], "spatial_size": [32, 24], "mode": ["bilinear"]},
            {"_target_": "ScaleIntensityd", "keys": ["image"]},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 4},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "argmax": True, "to_onehot": 2, "keys": ["pred"]},
            {"_target_": "Lambdad", "keys": ["pred"], "func": "$lambda x : x[1:]"},
            {"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict", "output_dir": "@output_dir",
             "output_ext": ".png", "scale": 255, "squeeze_end_dims": True},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }


def test_rgb_bundle_with_grey_level_png_masks(tmp_path):
    from monai.networks.nets import UNet

    root = tmp_path / "endoscopic_tool_segmentation"
    torch.manual_seed(3)
    net = UNet(spatial_dims=2, in_channels=3, out_channels=2, **TINY_UNET)
    state = _write_bundle(root, _endoscopy_config(), _metadata({"0": "background", "1": "tools"}, 3), net, "bare")
    entries = []
    for i in range(2):
        mask = _blob((45, 37), 30 + i) * 255
        rgb = np.stack([mask * 0.6 + 40, mask * 0.3 + 60, np.full(mask.shape, 90.0)], -1)
        rgb = (rgb + np.random.default_rng(i).normal(0, 8, rgb.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(tmp_path / f"frame_{i}.png")
        Image.fromarray(mask.astype(np.uint8), "L").save(tmp_path / f"frame_{i}_seg.png")
        entries.append({"image": f"frame_{i}.png", "label": f"frame_{i}_seg.png"})
    datalist = _datalist(tmp_path / "datalist.json", entries)
    bundle = read_bundle(root, label_values=[0, 255])
    assert any(s.startswith("EnsureChannelFirstd: the label keeps its own") for s in bundle.label_pipeline)
    assert bundle.input_range.clip == (0.0, 1.0)
    trained = [{"_target_": "LoadImaged", "keys": ["image", "label"]},
               {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": -1},
               {"_target_": "EnsureChannelFirstd", "keys": "label", "channel_dim": "no_channel"},
               {"_target_": "Resized", "keys": ["image", "label"], "spatial_size": [32, 24],
                "mode": ["bilinear", "nearest"]}]
    cases, _ = read_datalist(datalist)
    for case in cases:
        data = read_case(bundle, case)
        assert data.x.shape == (1, 3, 32, 24) and data.y.shape == (1, 1, 32, 24)
        expected = _label_as_trained(str(case.image), str(case.label), trained)
        torch.testing.assert_close(data.y[0], (expected == 255).long())
        assert 0 < int(data.y.sum()) < data.y.numel()
    net_o, inferer_o = _oracle(root, "inference.json", state)
    _check_forward_and_gradient(bundle, data.x, net_o, inferer_o)
    # the raw 0 / 255 mask without label_values: one line naming the label file and the way out
    with pytest.raises(ValueError, match=r"frame_0_seg\.png holds values \[255\.0\].*give label_values"):
        read_case(read_bundle(root), cases[0])


def _pediatric_yaml() -> dict:
    """models/pediatric_abdominal_ct_segmentation/configs/inference.yaml (DynUNet, overlap 0.75), tiny."""
    return {
        "imports": ["$import glob", "$import os"],
        "workflow_type": "inference",
        "input_channels": 1,
        "output_classes": 3,
        "output_channels": 3,
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval/dynunet_FT'",
        "dataset_dir": "/processed/Public/CT_TotalSegmentator/TS_split/test/",
        "data_list_file_path": "$@bundle_root + '/configs/TS_test.json'",
        "datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='validation')",
        "device": DEVICE,
        "spatial_size": [16, 16, 16],
        "spatial_dims": "$len(@spatial_size)",
        "labels": {"background": 0, "liver": 1, "spleen": 2},
        "network_def": {"_target_": "monai.networks.nets.DynUNet", "spatial_dims": "@spatial_dims",
                        "in_channels": "@input_channels", "out_channels": "@output_channels",
                        "kernel_size": [3, 3, 3], "strides": [1, 2, [2, 2, 1]],
                        "upsample_kernel_size": [2, [2, 2, 1]], "filters": [4, 8, 8],
                        "norm_name": "instance", "deep_supervision": False, "res_block": True},
        "network": "$@network_def.to(@device)",
        "image_key": "image",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": ["@image_key"], "pixdim": [1.5, 1.5, 3.0], "mode": ["bilinear"]},
            {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -250, "a_max": 400, "b_min": 0,
             "b_max": 1, "clip": True},
            {"_target_": "CropForegroundd", "keys": ["@image_key"], "source_key": "@image_key",
             "mode": ["minimum"]},
            {"_target_": "EnsureTyped", "keys": "image"},
            {"_target_": "CastToTyped", "keys": "@image_key", "dtype": "$torch.float32"},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 4,
                    "overlap": 0.75, "mode": "gaussian", "padding_mode": "replicate"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/dynunet_FT.pt'",
                      "load_dict": {"model": "@network"}}],
    }


def test_yaml_bundle_with_state_dict_checkpoint_named_by_its_checkpoint_loader(tmp_path):
    from monai.networks.nets import DynUNet

    root = tmp_path / "pediatric_abdominal_ct_segmentation"
    torch.manual_seed(4)
    net = DynUNet(3, 1, 3, [3, 3, 3], [1, 2, [2, 2, 1]], [2, [2, 2, 1]], filters=[4, 8, 8], norm_name="instance",
                  res_block=True)
    meta = _metadata({"0": "background", "1": "liver", "2": "spleen"})
    state = _write_bundle(root, _pediatric_yaml(), meta, net, "state_dict", "inference.yaml")
    (root / "models" / "model.pt").rename(root / "models" / "dynunet_FT.pt")
    entries = []
    for i in range(2):
        label = _blob((24, 22, 14), 40 + i, values=(1, 2))
        image = np.where(label > 0, 60.0 * label, -600.0) + np.random.default_rng(i).normal(0, 15, label.shape)
        entries.append({"image": _nifti(tmp_path / f"ct_{i}.nii.gz", image.astype(np.float32)),
                        "label": _nifti(tmp_path / f"ct_{i}_seg.nii.gz", label)})
    bundle = read_bundle(root)  # no inference.json: inference.yaml
    assert bundle.config_path.name == "inference.yaml" and bundle.checkpoint.name == "dynunet_FT.pt"
    assert bundle.inferer["mode"] == "gaussian" and bundle.inferer["padding_mode"] == "replicate"
    trained = [{"_target_": "LoadImaged", "keys": ["image", "label"]},
               {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
               {"_target_": "Orientationd", "keys": ["image", "label"], "axcodes": "RAS"},
               {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [1.5, 1.5, 3.0],
                "mode": ["bilinear", "nearest"]},
               {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -250, "a_max": 400, "b_min": 0,
                "b_max": 1, "clip": True},
               {"_target_": "CropForegroundd", "keys": ["image", "label"], "source_key": "image"}]
    cases, _ = read_datalist(_datalist(tmp_path / "datalist.json", entries))
    for case in cases:
        data = read_case(bundle, case)
        expected = _label_as_trained(str(case.image), str(case.label), trained)
        assert data.y.shape == (1, 1, *data.x.shape[2:]) == (1, *expected.shape)
        torch.testing.assert_close(data.y[0], expected.long())
    net_o, inferer_o = _oracle(root, "inference.yaml", state)
    _check_forward_and_gradient(bundle, data.x, net_o, inferer_o)


SCRIPT = '''
import torch
from monai.networks.nets import UNet


class ScaledUNet(torch.nn.Module):
    """A UNet whose logits are multiplied by a constant, defined in the bundle's own scripts/."""

    def __init__(self, scale: float, **kwargs):
        super().__init__()
        self.scale = scale
        self.unet = UNet(**kwargs)

    def forward(self, x):
        return self.unet(x) * self.scale
'''


def test_bundle_importing_its_own_scripts_package(tmp_path):
    import scripts as project_scripts  # this project's own package of the same name, imported first

    root = tmp_path / "custom_bundle"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "networks.py").write_text(SCRIPT)
    config = _slice_config()
    config["imports"] = ["$import glob", "$import scripts.networks"]
    config["network_def"] = {"_target_": "scripts.networks.ScaledUNet", "scale": 3.0, "spatial_dims": 2,
                             "in_channels": 1, "out_channels": 4, **TINY_UNET}
    config["inferer"] = {"_target_": "SliceInferer", "roi_size": [16, 16], "spatial_dim": 2, "sw_batch_size": 4,
                         "overlap": 0.5, "mode": "gaussian"}
    # transform lists joined by an expression, as spleen_deepedit_annotation's inference.json writes them
    transforms = config["preprocessing"]["transforms"]
    config["preprocessing_transforms"], config["extra_transforms"] = transforms[:2], transforms[2:]
    config["preprocessing"]["transforms"] = "$@preprocessing_transforms + @extra_transforms"
    with _fresh_process_imports(root):
        from scripts.networks import ScaledUNet  # the bundle's class, to make its weights

        torch.manual_seed(5)
        net = ScaledUNet(3.0, spatial_dims=2, in_channels=1, out_channels=4, **TINY_UNET)
    meta = _metadata({"0": "background", "1": "a", "2": "b", "3": "c"})
    state = _write_bundle(root, config, meta, net, "model")
    path_before = list(sys.path)
    bundle = read_bundle(root)
    assert sys.modules["scripts"] is project_scripts and "scripts.networks" not in sys.modules
    assert sys.path == path_before
    assert bundle.network_target == "scripts.networks.ScaledUNet"
    label = _blob((14, 16, 4), 50, values=(1, 3))
    image = _nifti(tmp_path / "img.nii.gz", (label * 30.0 + 5).astype(np.float32))
    datalist = _datalist(tmp_path / "datalist.json", [{"image": image, "label": _nifti(tmp_path / "lab.nii.gz", label)}])
    data = read_case(bundle, read_datalist(datalist)[0][0])
    assert data.y.shape == (1, 1, 14, 16, 4)
    np.testing.assert_array_equal(data.y[0, 0].numpy(), label)
    assert float(data.x.min()) == 0.0 and float(data.x.max()) == 1.0  # ScaleIntensityd of the second list
    net_o, inferer_o = _oracle(root, "inference.json", state)
    _check_forward_and_gradient(bundle, data.x, net_o, inferer_o)


def test_unreadable_bundles_fail_in_one_line_naming_file_and_key(tmp_path):
    root, datalist, state = _slice_bundle(tmp_path)
    config = _slice_config()
    config["inferer"] = {"_target_": "SliceInferer", "roi_size": [16, 16, 16], "spatial_dim": 2}
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        read_bundle(root)
    msg = str(err.value)
    assert "\n" not in msg and "inference.json" in msg and "key 'inferer'" in msg and "2D roi_size" in msg
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, root / "models" / "model.pt")
    config["inferer"] = {"_target_": "SliceInferer", "roi_size": [16, 16], "spatial_dim": 2}
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.pt: expected a state dict or a dict with key 'model' or "
                                         r"'state_dict', found \['optimizer'\]"):
        read_bundle(root)
    with pytest.raises(ValueError, match=r"inference\.json: no key 'sw_inferer'"):
        read_bundle(root, inferer_key="sw_inferer")


def test_label_gets_nearest_resizing_without_anti_aliasing(tmp_path):
    """Per-key settings of the image's resizes (bilinear / bicubic, align_corners, anti-aliasing) give the
    label nearest-neighbour resizing: oracle ``torch.nn.functional.interpolate(mode="nearest")``."""
    from common.card.bundle_reader import _parsed
    from common.card.label_transforms import extend_to_label

    label = np.zeros((23, 17), np.uint8)
    label[4:15, 3:9], label[9:20, 10:15] = 3, 7
    Image.fromarray(label, "L").save(tmp_path / "label.png")
    Image.fromarray((label * 20 + 5).astype(np.uint8), "L").save(tmp_path / "image.png")
    parser = ConfigParser({"preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Resized", "keys": ["image"], "spatial_size": [13, 11], "mode": ["bilinear"],
         "align_corners": [True], "anti_aliasing": True},
        {"_target_": "Zoomd", "keys": "image", "zoom": 1.5, "mode": "bicubic", "align_corners": True,
         "keep_size": False},
        {"_target_": "ScaleIntensityd", "keys": "image"},
    ]}})
    steps = extend_to_label(parser, tmp_path / "inference.json", _parsed)
    assert steps[2:] == ["Resized: label too (mode nearest)", "Zoomd: label too (mode nearest)",
                         "ScaleIntensityd: image only"]
    out = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "image.png"),
                                                      "label": str(tmp_path / "label.png")})
    raw = torch.as_tensor(np.asarray(Image.open(tmp_path / "label.png")).T.astype(np.float32))[None, None]
    expected = torch.nn.functional.interpolate(raw, size=(13, 11), mode="nearest")
    expected = torch.nn.functional.interpolate(expected, scale_factor=1.5, mode="nearest",
                                               recompute_scale_factor=True)
    assert out["image"].shape == out["label"].shape == (1, 19, 16)
    torch.testing.assert_close(out["label"].as_tensor(), expected[0])
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 3.0, 7.0}


def test_card_on_the_slice_inferer_bundle_matches_direct_calls(tmp_path):
    """The whole card (``run_card``) on the SliceInferer bundle: its clean Dice per case and class equals
    MONAI's ``SliceInferer`` + the network, argmax, and Dice by its formula on the raw label files."""
    from common.card.runner import run_card

    root, datalist, state = _slice_bundle(tmp_path)
    run_card(root, datalist, output_dir=tmp_path / "card", eps=[0.02], sigmas=[0.25], n0=2, n=8, steps=1, seed=0,
             progress=False)
    card = json.loads((tmp_path / "card" / "card.json").read_text())
    assert card["bundle"]["inferer"]["type"] == "SliceInferer"
    net, inferer = _oracle(root, "inference.json", state)
    names = ["left ventricle", "myocardium", "right ventricle"]
    for case in read_datalist(datalist)[0]:
        image = nib.load(str(case.image)).get_fdata().astype(np.float32)
        x = torch.as_tensor((image - image.min()) / (image.max() - image.min()))[None, None]  # ScaleIntensityd
        with torch.no_grad():
            pred = inferer(x, net).argmax(1)[0].numpy()
        truth = np.asarray(nib.load(str(case.label)).dataobj)
        for c, name in enumerate(names, start=1):
            p, g = pred == c, truth == c
            dice = 1.0 if not (p.any() or g.any()) else 2.0 * (p & g).sum() / (p.sum() + g.sum())
            assert card["clean"]["per_case"][case.case_id][name] == pytest.approx(dice, abs=1e-6)
