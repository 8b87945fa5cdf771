"""The watch: between reconcile passes, every ``REFIT_WATCH_INTERVAL_S``, it notices what a pass
should handle now and wakes one (service/reconciler.py).

- The registry's listing changed (a promotion made through another service replica): the
  catalog is re-read at once, so Predicts see a new default before the pass runs.
- A TorchServe replica stopped answering, lost its models (restarted), came back or joined (DNS).
  A replica in the rotation found so leaves it at once; a pass registers everything on it and
  puts it back.
"""

from __future__ import annotations

import logging
import threading

from refit.errors import RefitError
from service.reconciler import Reconciler

log = logging.getLogger(__name__)


class Watch:
    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        self.catalog = reconciler.catalog
        self.torchserve = reconciler.torchserve

    def run_forever(self, interval_s: float, stop: threading.Event) -> None:
        while not stop.wait(interval_s):
            if self._registry_changed() | self._replicas_changed():
                self.reconciler.wake()

    def _registry_changed(self) -> bool:
        try:
            if not self.catalog.changed():
                return False
            self.catalog.refresh()  # Predicts see a new default before the pass runs
        except Exception as exc:  # kept by the catalog (refit_object_store_up); passes go on
            log.debug("registry watch failed: %s", getattr(exc, "message", None) or exc)
            return False
        return True

    def _replicas_changed(self) -> bool:
        """A replica joined, left, died, lost its models or answers again. One in rotation that
        fails the check leaves the rotation now, before the pass that brings it back in line."""
        replicas = self.torchserve.replicas()
        view = self.reconciler.view()
        changed = {r.name for r in replicas} != set(view.reachable)
        failing = set()
        for replica in replicas:
            try:
                up, names = True, replica.model_names()
            except RefitError:
                up, names = False, set()
            if replica.name in view.rotation and not (up and view.expected <= names):
                failing.add(replica.name)
            elif up and not view.reachable.get(replica.name, False):
                changed = True
        if failing:
            self.reconciler.take_out(failing, replicas)
        return changed or bool(failing)
