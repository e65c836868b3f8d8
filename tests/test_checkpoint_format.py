"""The weights layout the bundles publish: ``{"model": CPU state dict}``.

MONAI's ``CheckpointSaver`` with a one-entry ``save_dict`` (what the train configs use for ``model.pt``)
writes a *bare* state dict — shown here on a real evaluator run — and ``common.checkpoint.WeightsSaver``
writes the ``{"model": ...}`` layout, on the key metric's improvements only (or once at the end), which
MONAI's ``CheckpointLoader`` and ``common.checkpoint.load_weights`` both read."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointLoader, CheckpointSaver, MeanSquaredError, from_engine

from common.checkpoint import WeightsSaver, load_weights


def _evaluator(network: nn.Module, handlers: list) -> SupervisedEvaluator:
    """An evaluator whose key metric is the MSE between ``w·x`` and ``x`` = (w − 1)² · mean(x²) for a
    1×1 convolution of weight w; MONAI's default comparison counts a *larger* value as better."""
    x = torch.arange(1.0, 9.0).reshape(2, 1, 2, 2)
    data = [{"image": x, "label": x}]
    return SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=data, network=network,
        key_val_metric={"mse": MeanSquaredError(output_transform=from_engine(["pred", "label"]))},
        val_handlers=handlers,
    )


def _set(network: nn.Module, w: float) -> None:
    with torch.no_grad():
        network.weight.fill_(w)


def test_checkpoint_saver_writes_a_bare_state_dict_and_weights_saver_wraps_it(tmp_path):
    net = nn.Conv2d(1, 1, 1, bias=False)
    saver = WeightsSaver(nn.DataParallel(net), tmp_path / "ours")
    monai_saver = CheckpointSaver(save_dir=str(tmp_path / "monai"), save_dict={"model": net}, save_key_metric=True,
                                  key_metric_filename="model.pt")
    evaluator = _evaluator(net, [saver, monai_saver])
    _set(net, 2.0)
    evaluator.run(global_epoch=1)
    bare = torch.load(tmp_path / "monai" / "model.pt", map_location="cpu", weights_only=True)
    assert set(bare) == {"weight"}  # ignite unwrapped the single entry: no "model" key
    ours = torch.load(tmp_path / "ours" / "model.pt", map_location="cpu", weights_only=True)
    assert set(ours) == {"model"} and set(ours["model"]) == {"weight"}  # no "module." prefix from DataParallel
    assert all(v.device.type == "cpu" for v in ours["model"].values())
    assert float(ours["model"]["weight"].flatten()[0]) == 2.0


def test_best_mode_writes_only_when_the_key_metric_improves(tmp_path):
    net = nn.Conv2d(1, 1, 1, bias=False)
    evaluator = _evaluator(net, [WeightsSaver(net, tmp_path, when="best")])
    path = tmp_path / "model.pt"
    saved = []
    for epoch, w in enumerate((2.0, 1.5, 3.0), start=1):  # metric (w-1)^2·mean(x^2): 1, 0.25, 4 (×25.5)
        _set(net, w)
        evaluator.run(global_epoch=epoch)
        saved.append(float(torch.load(path, weights_only=True)["model"]["weight"].flatten()[0]))
        assert evaluator.state.metrics["mse"] == pytest.approx((w - 1.0) ** 2 * 25.5)
    assert saved == [2.0, 2.0, 3.0]  # epoch 2 was worse than epoch 1: the file kept epoch 1's weights


def test_final_mode_and_monai_checkpoint_loader_read_the_layout(tmp_path):
    net = nn.Conv2d(1, 1, 1, bias=False)
    _set(net, 0.5)
    _evaluator(net, [WeightsSaver(net, tmp_path, filename="final.pt", when="final")]).run(global_epoch=1)
    fresh = nn.Conv2d(1, 1, 1, bias=False)
    _set(fresh, 0.0)
    loader = CheckpointLoader(load_path=str(tmp_path / "final.pt"), load_dict={"model": fresh}, map_location="cpu")
    _evaluator(fresh, [loader]).run(global_epoch=1)  # CheckpointLoader loads at STARTED
    assert float(fresh.weight.detach().flatten()[0]) == 0.5
    other = load_weights(nn.Conv2d(1, 1, 1, bias=False), tmp_path / "final.pt")
    assert float(other.weight.detach().flatten()[0]) == 0.5


def test_bad_arguments_name_themselves(tmp_path):
    with pytest.raises(ValueError, match="when"):
        WeightsSaver(nn.Conv2d(1, 1, 1), tmp_path, when="worst")
    with pytest.raises(ValueError, match="network"):
        WeightsSaver("net", tmp_path)
    with pytest.raises(ValueError, match="filename"):
        WeightsSaver(nn.Conv2d(1, 1, 1), tmp_path, filename="")

    class _NoMetric:
        class state:
            epoch = 1

    with pytest.raises(ValueError, match="key metric"):
        WeightsSaver(nn.Conv2d(1, 1, 1), tmp_path)(_NoMetric())


class _Payload:
    """Unpickling this runs code (creates a file): what ``weights_only=True`` must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_checkpoints_are_input_errors_naming_the_file(tmp_path):
    from common.errors import InputError, MissingInputError

    net = nn.Conv2d(1, 1, 1, bias=False)
    with pytest.raises(MissingInputError, match=str(tmp_path / "absent.pt")):
        load_weights(net, tmp_path / "absent.pt")
    good = tmp_path / "good.pt"
    WeightsSaver(net, tmp_path, filename="good.pt", when="final")(None)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(InputError, match=f"checkpoint {truncated}: cannot be read"):
        load_weights(net, truncated)
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, evil)
    with pytest.raises(InputError, match=f"checkpoint {evil}: cannot be read") as info:
        load_weights(net, evil)
    assert not marker.exists() and "\n" not in str(info.value)
    with pytest.raises(InputError, match=f"checkpoint {good}: does not fit Conv2d"):
        load_weights(nn.Conv2d(1, 2, 1, bias=False), good)
