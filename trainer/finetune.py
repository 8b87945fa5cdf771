"""Transfer-learning surgery: a backbone with a new head, lower units frozen.

Freeze depth ``k`` freezes the stem plus the first ``k`` units above it; ``NO_FREEZE`` (-1)
trains everything. Frozen BatchNorm layers keep their ImageNet statistics: ``FineTuneModel.train``
puts them back in eval mode, so a later ``model.train()`` (or DDP) never updates them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.backbones import BackboneSpec
from trainer.config import NO_FREEZE


class FineTuneModel(nn.Module):
    """Wraps a backbone (``net``); the wrapper exists to keep frozen BatchNorm layers in eval."""

    def __init__(self, net: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.frozen_depth = NO_FREEZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> FineTuneModel:
        super().train(mode)
        if mode:
            for bn in frozen_batchnorms(self.net):
                bn.eval()
        return self

    def units(self) -> list[nn.Module]:
        return self.spec.units(self.net)

    def head(self) -> nn.Module:
        return self.net.get_submodule(self.spec.head)

    def max_depth(self) -> int:
        return len(self.units()) - 1

    def freeze(self, depth: int) -> None:
        """Freeze the stem and the first ``depth`` units; everything else trains."""
        units = self.units()
        if depth < NO_FREEZE or depth > len(units) - 1:
            raise ValueError(f"freeze depth {depth} out of range -1..{len(units) - 1}")
        for p in self.net.parameters():
            p.requires_grad_(True)
        for unit in units[: depth + 1]:
            for p in unit.parameters():
                p.requires_grad_(False)
        self.frozen_depth = depth
        self.train(self.training)  # re-apply the BatchNorm modes

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def frozen_batchnorms(module: nn.Module) -> Iterator[_BatchNorm]:
    for m in module.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, _BatchNorm) and params and not any(p.requires_grad for p in params):
            yield m


def resolve_freeze(spec: BackboneSpec, freeze: int | None) -> int:
    return spec.default_freeze if freeze is None else freeze
