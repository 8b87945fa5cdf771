"""Evaluate the current default on a candidate's validation split, for the promotion gate.

The default's weights come from the ``weights_key`` in its lineage (stored by the engine); it is
evaluated with its OWN preprocessing (resize/crop from its hyperparameters) on the candidate's
split (same dataset, val_fraction and seed). See refit.publish for what the gate does with it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from refit.promotion import Baseline
from refit.registry import VersionRecord
from refit.storage import ObjectStore
from trainer.backbones import BackboneRegistry, replace_head
from trainer.config import TrainConfig
from trainer.engine import evaluate
from trainer.hardware import Hardware
from trainer.preprocessing import Preprocessing
from trainer.transforms import eval_transform
from trainer.weights import load_weights

EVAL_BATCH = 64  # scoring only: any size gives the same accuracy
CPU = Hardware(device=torch.device("cpu"), amp_dtype=None, channels_last=False)


def evaluate_default(
    store: ObjectStore, config: TrainConfig, class_names: list[str], record: VersionRecord
) -> Baseline:
    if list(record.class_names) != list(class_names):
        return Baseline(record.version, None, "its class names differ from the new dataset's")
    key = record.lineage.weights_key
    if not key:
        return Baseline(record.version, None, "it has no stored weights to evaluate")
    saved = load_weights(store, config.bucket, key)
    spec = BackboneRegistry().get(saved["backbone"])
    net = spec.build()
    replace_head(net, spec, len(saved["class_names"]))
    net.load_state_dict(saved["state_dict"])
    pre = Preprocessing.from_hyperparameters(record.lineage.hyperparameters, spec.crop_size)
    from trainer.data import open_dataset

    val = open_dataset(
        config.dataset, store=store, split="val", transform=eval_transform(pre),
        val_fraction=config.val_fraction, seed=config.seed, shuffle=False, rank=0, world_size=1,
    )  # fmt: skip
    loader = DataLoader(val, batch_size=EVAL_BATCH, num_workers=0)
    with torch.inference_mode():
        result = evaluate(net, nn.CrossEntropyLoss(), loader, CPU, len(class_names))
    return Baseline(record.version, result.accuracy)
