"""Epoch bookkeeping and resumption.

Semantics: ``samples_seen`` counts samples *this rank's training loop has taken* in the current
epoch. The dataset cannot see that itself when DataLoader workers iterate copies of it, so the loop
reports it with ``dataset.advance(len(labels))`` after each batch. ``state_dict()`` saves
(epoch, samples_seen); after ``load_state_dict`` the next iteration of that epoch skips exactly the
first ``samples_seen`` samples of this rank's order (same seed, data and world size required), and
``set_epoch`` to another epoch starts it from the beginning. Never calling ``advance`` is safe: a
resumed job then re-reads the whole interrupted epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data.errors import ResumeMismatch

STATE_VERSION = 1


@dataclass
class Progress:
    digest: str
    seed: int
    world_size: int
    epoch: int = 0
    samples_seen: int = 0
    skip: int = 0  # samples of ``epoch`` to skip on the next iteration (from a checkpoint)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.samples_seen, self.skip = epoch, 0, 0

    def advance(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot advance by {n}")
        self.samples_seen += n

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "seed": self.seed,
            "world_size": self.world_size,
            "digest": self.digest,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, "seed": self.seed, "world_size": self.world_size}
        expected["digest"] = self.digest
        for name, value in expected.items():
            if state.get(name) != value:
                raise ResumeMismatch(
                    f"saved dataset state has {name}={state.get(name)!r}, this dataset has "
                    f"{value!r}; resume with the same data, seed and world size"
                )
        self.epoch = int(state["epoch"])
        self.samples_seen = self.skip = int(state["samples_seen"])
