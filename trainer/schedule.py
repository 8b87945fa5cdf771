"""How a run optimises: its phases (head-only first, optionally), and in each one AdamW with a
one-cycle learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.finetune import FineTuneModel
from trainer.hardware import Hardware, distribute


@dataclass(frozen=True)
class Phase:
    index: int
    first_epoch: int
    end_epoch: int  # exclusive
    freeze: int
    lr: float

    @property
    def epochs(self) -> int:
        return self.end_epoch - self.first_epoch


def plan_phases(config: TrainConfig, freeze: int, max_depth: int) -> list[Phase]:
    """One phase, or head-only (everything below the head frozen) then fine-tune at a lower LR."""
    if config.head_epochs == 0:
        return [Phase(0, 0, config.epochs, freeze, config.lr)]
    phases = [Phase(0, 0, config.head_epochs, max_depth, config.lr)]
    if config.head_epochs < config.epochs:
        lr = config.lr * config.finetune_lr_scale
        phases.append(Phase(1, config.head_epochs, config.epochs, freeze, lr))
    return phases


class OneCycle:
    """LR multiplier: linear warm-up to 1, then cosine down to ``1/final_div``. A callable object
    (not a closure) so LambdaLR's state_dict keeps it; clamped so an over-long epoch is safe."""

    def __init__(
        self, total_steps: int, pct_start: float = 0.2, div: float = 25.0, final_div: float = 1e3
    ) -> None:
        self.total_steps = max(total_steps, 1)
        self.warmup = max(int(self.total_steps * pct_start), 1)
        self.div, self.final_div = div, final_div

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return 1 / self.div + (1 - 1 / self.div) * step / self.warmup
        progress = min((step - self.warmup) / max(self.total_steps - self.warmup, 1), 1.0)
        low = 1 / self.final_div
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Optimization:
    """One phase's stepping: the model as stepped (DDP-wrapped across ranks), loss, optimizer,
    LR schedule and, for fp16, a gradient scaler."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None

    @classmethod
    def for_phase(
        cls, model: FineTuneModel, phase: Phase, config: TrainConfig, hw: Hardware, steps: int
    ) -> Optimization:
        """``steps``: batches per epoch. Freezes ``model`` as the phase says."""
        model.freeze(phase.freeze)
        optimizer = torch.optim.AdamW(
            model.trainable_parameters(), lr=phase.lr, weight_decay=config.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, OneCycle(steps * phase.epochs))
        return cls(
            model=distribute(model, hw),
            criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=torch.amp.GradScaler(hw.device.type) if hw.needs_grad_scaler else None,
        )

    def load_state_dict(self, optimizer: dict, scheduler: dict) -> None:
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
