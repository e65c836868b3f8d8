"""common.finetune.init_from: the NLCEN ablation's "fine-tune by freezing the layers of the w/o NLCE model"
(He et al., AAAI 2019) on a tiny NLCEN: after optimizer steps the loaded part is bit-identical (weights and
BatchNorm statistics) and only the NLCE modules moved; the unfreeze stage trains everything."""

from __future__ import annotations

import pytest
import torch

from common.finetune import init_from
from common.networks.nlcen import NLCEN

TINY = dict(in_channels=1, out_channels=2, backbone="resnet18", fpn_channels=16, num_codes=4, widen_factor=0.25)


def _step(net: torch.nn.Module, steps: int = 2) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    net.train()
    for i in range(steps):
        x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(i))
        out = net(x)
        loss = sum(o.square().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_frozen_part_is_bit_identical_and_only_nlce_trains(tmp_path):
    torch.manual_seed(0)
    base = NLCEN(**TINY, use_nlce=False)
    _step(base, 1)  # non-trivial BatchNorm statistics
    torch.save({"model": base.state_dict()}, tmp_path / "model.pt")
    before = {k: v.clone() for k, v in base.state_dict().items()}

    torch.manual_seed(1)
    net = init_from(NLCEN(**TINY, use_nl=False), tmp_path / "model.pt", freeze=True)  # "w/o NL"
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("nlce.") for n in trainable)
    new = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("nlce.")}
    _step(net)
    after = net.state_dict()
    for k, v in before.items():  # num_batches_tracked only counts (it matters only for momentum None)
        assert k.endswith("num_batches_tracked") or torch.equal(after[k], v), f"{k} moved although frozen"
    moved = [k for k, v in new.items() if v.is_floating_point() and not torch.equal(after[k], v)]
    assert any(k.startswith("nlce.") for k in moved)


def test_unfreeze_needs_the_whole_network_and_trains_it(tmp_path):
    full = NLCEN(**TINY)
    torch.save({"model": full.state_dict()}, tmp_path / "full.pt")
    torch.save({"model": NLCEN(**TINY, use_nlce=False).state_dict()}, tmp_path / "base.pt")
    with pytest.raises(ValueError, match=r"base\.pt: lacks \d+ tensors"):
        init_from(NLCEN(**TINY), tmp_path / "base.pt", freeze=False)
    with pytest.raises(ValueError, match=r"full\.pt: does not fit NLCEN: unexpected keys \['nlce"):
        init_from(NLCEN(**TINY, use_nlce=False), tmp_path / "full.pt")
    with pytest.raises(ValueError, match="leaves nothing to train"):
        init_from(NLCEN(**TINY), tmp_path / "full.pt", freeze=True)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        init_from(NLCEN(**TINY), tmp_path / "nowhere.pt")
    net = init_from(NLCEN(**TINY), tmp_path / "full.pt")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), full.state_dict().values()))
    assert all(p.requires_grad for p in net.parameters())
