"""A tqdm progress bar fed by the trainer's progress events (epoch, batch, loss, images/s, ETA)."""

from __future__ import annotations

import math

from tqdm import tqdm

from trainer.engine import ProgressEvent


class TqdmProgress:
    """One bar per epoch; the postfix carries loss, accuracy, images/s and the run's ETA."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bar: tqdm | None = None
        self.epoch = -1

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, event: ProgressEvent) -> None:
        if event.epoch != self.epoch:
            self.close()
            self.epoch = event.epoch
            self.bar = tqdm(
                total=event.batches,
                desc=f"epoch {event.epoch + 1}/{event.epochs}",
                unit="batch",
                disable=self.disable,
                dynamic_ncols=True,
            )
        assert self.bar is not None
        self.bar.update(max(event.batch - self.bar.n, 0))
        postfix = {
            "loss": f"{event.loss:.3f}",
            "acc": f"{event.accuracy:.3f}",
            "img/s": f"{event.images_per_second:.0f}",
            "eta": _duration(event.eta_seconds),
        }
        if event.val is not None:
            postfix["val_acc"] = f"{event.val['accuracy']:.3f}"
        self.bar.set_postfix(postfix, refresh=True)
        if event.kind == "epoch":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
