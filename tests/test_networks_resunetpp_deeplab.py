"""ResUNet++ (Jha et al., IEEE ISM 2019) and DeepLabV2 (Chen et al., TPAMI 2018), the other two segmenters
of Laousy et al.'s Table 1 (MICCAI 2023): shapes, input checks, TorchScript and ONNX parity with the eager
network, a few training steps on chest phantoms, and the ``certified_seg`` bundle trained and certified with
each through ``python -m monai.bundle run``."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

from common.checkpoint import load_weights
from common.data.synthetic import chest_xray_phantom
from common.networks import DeepLabV2, ResUNetPlusPlus, deeplab_dilations
from tests.bundle_run import BUNDLES, run_bundle

NAME = "certified_seg"
SMALL = {  # CPU-sized versions with the papers' structure
    "resunetpp": lambda: ResUNetPlusPlus(2, 1, 4, channels=(8, 16, 32), strides=(2, 2), bridge_channels=32),
    "deeplabv2": lambda: DeepLabV2(2, 1, 4, channels=(8, 8, 16, 16), strides=(1, 2, 1), num_res_units=1),
}


def _net(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = SMALL[name]()
    net.train()
    with torch.no_grad():  # batch-norm statistics that are not the initial ones
        net(torch.rand(2, 1, 32, 32))
    return net.eval()


@pytest.mark.parametrize("name", list(SMALL))
def test_shapes_for_two_input_sizes_and_input_checks(name):
    net = _net(name)
    assert net.stride == (4 if name == "resunetpp" else 8)  # 4 for the stem times the strides
    for size in ((32, 32), (48, 64)):
        assert net(torch.rand(2, 1, *size)).shape == (2, 4, *size)
    net.train()
    assert net(torch.rand(2, 1, 32, 48)).shape == (2, 4, 32, 48)  # one output type in both modes
    with pytest.raises(ValueError, match="divisible"):
        net(torch.rand(1, 1, 32, 34))
    with pytest.raises(ValueError, match="channel"):
        net(torch.rand(1, 3, 32, 32))


def test_paper_defaults():
    net = ResUNetPlusPlus(2, 3, 1)  # Jha et al.: filters 16-32-64-128, ASPP bridge 256, 3 downsamplings
    assert net.stride == 8 and net.bridge.conv_k1.conv.out_channels == 256
    assert [d.res[0].out_channels for d in net.decoder] == [128, 64, 32]
    deeplab = DeepLabV2(2, 1, 4)  # output stride 8: stem 4, strides (1, 2, 1, 1), dilations (1, 1, 2, 4)
    assert deeplab.stride == 8 and deeplab_dilations((1, 2, 1, 1)) == (1, 1, 2, 4)
    assert [b.conv.dilation for b in deeplab.head.branches] == [(r, r) for r in (6, 12, 18, 24)]
    with pytest.raises(ValueError, match="dilated"):
        DeepLabV2(2, 1, 4, strides=(1, 1, 2, 1), dilations=(1, 2, 2, 1))
    with pytest.raises(ValueError, match="multiples of 4"):
        ResUNetPlusPlus(2, 1, 2, channels=(6, 16), strides=(2,))


@pytest.mark.parametrize("name", list(SMALL))
def test_torchscript_matches_eager(name):
    net = _net(name)
    scripted = torch.jit.script(net)
    x = torch.rand(2, 1, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SMALL))
def test_onnx_export_matches_eager_in_onnxruntime(name, tmp_path):
    net = _net(name)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(net, (torch.rand(1, 1, 32, 32),), str(path), input_names=["x"], output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 1, 32, 32)  # a fresh input, not the export's example
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, net(x).numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", list(SMALL))
def test_a_few_training_steps_lower_the_loss_on_chest_phantoms(name):
    pairs = [chest_xray_phantom((32, 32), seed=s, target="classes") for s in range(4)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])).float()
    y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
    y = torch.where(y == 2, 1, torch.where(y > 2, y - 1, y))  # lung, heart, clavicles as in label_map
    net = _net(name).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("name", ["resunetpp", "deeplabv2"])
def test_bundle_trains_and_certifies_each_network(name, tmp_path, monkeypatch):
    """The README's demo commands: ``['train.json', 'demo.json', '<net>.json']`` trains the network (the
    paper-sized one: the network config comes last) into its own folder, and the certify config composed
    the same way certifies that checkpoint into the network's own eval folder."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    demo = tmp_path / "demo"
    tiny = {"demo_dir": str(demo), "max_epochs": 1}
    run_bundle(NAME, ["train.json", "demo.json", f"{name}.json"], tiny)
    ckpt = demo / "models" / "chest" / name / "base" / "model.pt"
    assert ckpt.is_file() and not (demo / "models" / "chest" / "base").exists()  # not the UNet's folder
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / NAME / "configs" / f) for f in ("train.json", "demo.json", f"{name}.json")])
    parser["bundle_root"] = str(BUNDLES / NAME)
    net = load_weights(parser.get_parsed_content("network_def"), ckpt)
    assert type(net) is {"resunetpp": ResUNetPlusPlus, "deeplabv2": DeepLabV2}[name]
    assert net(torch.rand(1, 1, 32, 32)).shape == (1, 4, 32, 32)

    run_bundle(NAME, ["train.json", "certify.json", "demo.json", f"{name}.json"], tiny)
    certify = demo / "eval" / "chest" / name / "base" / "certify"
    summary = json.loads((certify / "summary.json").read_text())
    assert {e["method"] for e in summary["entries"]} == {"smoothing_base"}  # from the network's checkpoint
    assert (certify / "figure.png").is_file() and not (demo / "eval" / "chest" / "base").exists()
