"""ONNX export of every bundle with MONAI's ``onnx_export`` and parity with the eager network in onnxruntime.

``monai.bundle.onnx_export`` is the function behind ``python -m monai.bundle onnx_export network_def
--filepath X.onnx --ckpt_file ... --meta_file configs/metadata.json --config_file configs/inference.json``;
with its defaults on torch >= 2.9 it hands the ``nn.Module`` to ``torch.onnx.export``'s dynamo exporter,
which captures the graph with ``torch.export.export(strict=False)`` (needs ``onnxscript``). The exported file
run by onnxruntime (CPU) must give the eager network's logits on a fresh input of the exported shape.

torch.export: every network here exports (the ONNX path above is ``torch.export``), but MONAI 1.6.1 has no
bundle command that writes or loads a ``torch.export`` program (``monai/bundle`` knows TorchScript
``.ts`` and ONNX only; there is no ``.pt2`` export or loader), so the bundles ship TorchScript
(``ckpt_export``, scripted: ``test_bundle_conformance.py``) and ONNX; no bundle offers a ``.pt2``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from monai.bundle import ConfigParser, onnx_export

from bundle_run import BUNDLES

ALL_BUNDLES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir())
# small inputs the networks accept (the exported graph has static shapes: the export shape is the one served)
ONNX_SHAPES = {
    "certified_seg": [1, 1, 32, 32],
    "nlcen_lung": [1, 1, 32, 32],
    "resdsn_c2f_pancreas": [1, 1, 16, 16, 16],
    "unet3d_brats_distill": [1, 4, 32, 32, 32],
    "unet_advaug": [1, 1, 32, 32],
}
pytestmark = pytest.mark.slow


def test_every_bundle_has_an_onnx_shape():
    assert set(ONNX_SHAPES) == set(ALL_BUNDLES), "add the new bundle's small input shape to ONNX_SHAPES"


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_onnx_export_runs_in_onnxruntime_like_the_eager_network(name, tmp_path):
    bundle = BUNDLES / name
    shape = ONNX_SHAPES[name]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    ckpt = tmp_path / "model.pt"
    torch.save({"model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}, ckpt)
    onnx_path = tmp_path / "model.onnx"
    onnx_export(net_id="network_def", filepath=str(onnx_path), ckpt_file=str(ckpt), key_in_ckpt="model",
                meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), input_shape=shape)
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    assert len(model.graph.output) == 1, f"{name}: the exported graph has {len(model.graph.output)} outputs, not the logits"

    torch.manual_seed(1)
    x = torch.rand(shape)
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = next(iter(meta["network_data_format"]["outputs"].values()))["num_channels"]
    assert got.shape == expected.shape == (shape[0], channels, *shape[2:])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the logits decide the labels: argmax agrees wherever the top two classes are not within the tolerance
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3
    assert np.array_equal(got.argmax(1)[clear], expected.argmax(1)[clear])
