"""Freezing: frozen weights and BatchNorm statistics stay put, trainable ones move."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.backbones import BackboneRegistry, WeightsSource, build_backbone
from trainer.finetune import FineTuneModel, frozen_batchnorms


@pytest.fixture
def model() -> FineTuneModel:
    spec = BackboneRegistry().get("efficientnet_lite0")
    return FineTuneModel(build_backbone(spec, 3, pretrained=True, weights=WeightsSource()), spec)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_steps(model: FineTuneModel, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        images, labels = torch.rand(8, 3, 64, 64) * 3, torch.randint(0, 3, (8,))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_frozen_units_and_their_batchnorm_statistics_do_not_change(model: FineTuneModel) -> None:
    model.freeze(10)
    units = model.units()
    frozen, trainable = torch.nn.ModuleList(units[:11]), torch.nn.ModuleList(units[11:])
    frozen_before, trainable_before = _snapshot(frozen), _snapshot(trainable)
    head_before = _snapshot(model.head())
    _train_steps(model)
    frozen_after, trainable_after = _snapshot(frozen), _snapshot(trainable)
    for key, value in frozen_before.items():
        assert torch.equal(value, frozen_after[key]), f"frozen {key} changed"
    changed = [k for k, v in trainable_before.items() if not torch.equal(v, trainable_after[k])]
    assert any(k.endswith("weight") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)  # trainable BN layers do adapt
    assert not torch.equal(head_before["weight"], model.head().weight)


def test_frozen_batchnorm_stays_in_eval_mode_after_train(model: FineTuneModel) -> None:
    model.freeze(10)
    model.train()
    frozen_bns = list(frozen_batchnorms(model))
    assert frozen_bns and all(not bn.training for bn in frozen_bns)
    live = [m for m in model.units()[-1].modules() if isinstance(m, _BatchNorm)]
    assert live and all(bn.training for bn in live)
    model.eval()
    model.train(True)
    assert all(not bn.training for bn in frozen_batchnorms(model))


def test_optimizer_sees_only_trainable_parameters(model: FineTuneModel) -> None:
    model.freeze(10)
    trainable = model.trainable_parameters()
    assert all(p.requires_grad for p in trainable)
    expected = sum(p.numel() for unit in model.units()[11:] for p in unit.parameters())
    expected += sum(p.numel() for p in model.head().parameters())
    assert sum(p.numel() for p in trainable) == expected


def test_freeze_depth_range(model: FineTuneModel) -> None:
    model.freeze(-1)
    assert len(model.trainable_parameters()) == len(list(model.parameters()))
    model.freeze(model.max_depth())  # head only
    assert model.trainable_parameters() == list(model.head().parameters())
    with pytest.raises(ValueError, match="out of range"):
        model.freeze(model.max_depth() + 1)
    model.freeze(2)  # unfreezing again restores requires_grad above the new depth
    assert all(p.requires_grad for p in model.units()[3].parameters())
