"""The readiness rule: which TorchServe replicas get Predicts, when this service replica is ready
(gRPC health SERVING, which the Kubernetes readiness probe and compose's healthcheck read), and
which problems are a model's own (``model_problems``).

A service replica is SERVING when it can answer Predicts for the defaults it has cached: at least
one TorchServe replica is reachable and in the rotation. A replica is in the rotation when it
serves every *servable* default.

- A default that every reachable replica refused (a broken archive) is not servable: it is that
  model's problem (GetModel ``problem``, ``refit_model_problem``, the RefitModelNotServed alert)
  and never counts against readiness, so one model's problem never takes the pods that serve
  the other models out of rotation.
- A default that no replica has loaded *yet* (start-up, a replica that restarted) is servable:
  pending is not failed, and a replica without it is not in the rotation. Right after start-up
  nothing is in the rotation until the defaults are loaded.
- While the registry cannot be read (an object-store outage) which defaults are refused is not
  decided again: a registration that fails then may be the store's fault, not the archive's. The
  replicas go on serving the cached defaults; the outage shows in ``refit_object_store_up``
  and GetModel. With nothing cached (the store down at start-up) nothing can be answered: not
  ready (service/reconciler.py).
- A failed SetDefault does not count: every Predict names its version, so TorchServe's default
  pointer is never used to answer. It is logged, counted and retried.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.catalog import ModelEntry

REGISTERED, PENDING, FAILED = "registered", "pending", "failed"
SEVERITY = {REGISTERED: 0, PENDING: 1, FAILED: 2}


@dataclass(frozen=True)
class Registration:
    """Whether one TorchServe replica holds one version, as the last reconcile pass saw it."""

    state: str = PENDING
    error: str = ""
    attempts: int = 0  # failed attempts in a row
    retry_at: float = 0.0  # monotonic time of the next attempt after a failure
    replica: str = ""


# (model, version) -> replica name -> its registration there
Registrations = dict[tuple[str, str], dict[str, Registration]]


@dataclass(frozen=True)
class Rotation:
    in_line: frozenset[str]  # replicas that serve every servable default: they get Predicts
    required: frozenset[str]  # models whose default is servable: each replica in line holds it
    refused: dict[str, str]  # model -> why its default is not servable

    @property
    def ready(self) -> bool:
        return bool(self.in_line)


def decide(
    defaults: Mapping[str, str],
    registrations: Registrations,
    reachable: Mapping[str, bool],
    refused_before: Mapping[str, str] | None = None,
) -> Rotation:
    """The rule (module doc). ``defaults``: model -> its default version, for the defaults that
    have a record; ``refused_before``: while the registry cannot be read, the last decision's
    refused defaults (only those may be refused now)."""
    up = [replica for replica, answered in reachable.items() if answered]
    refused = {}
    for model, version in defaults.items():
        states = [registrations.get((model, version), {}).get(r, Registration()) for r in up]
        if not states or any(state.state != FAILED for state in states):
            continue
        if refused_before is None or model in refused_before:
            refused[model] = (
                f"its default v{version} cannot be loaded: every TorchServe replica refused it "
                f"({states[0].error}); make a version that loads the default "
                f"(`refit promote {model} VERSION`)"
            )
    required = frozenset(defaults) - set(refused)
    in_line = frozenset(
        replica
        for replica in up
        if all(_state(registrations, model, defaults[model], replica) == REGISTERED
               for model in required)
    )  # fmt: skip
    return Rotation(in_line, required, refused)


def _state(registrations: Registrations, model: str, version: str, replica: str) -> str:
    return registrations.get((model, version), {}).get(replica, Registration()).state


def model_problems(
    errors: dict[str, str],
    entries: list[ModelEntry],
    registrations: Registrations,
    decision: Rotation,
) -> dict[str, str]:
    """Each model's problem, for GetModel and ``refit_model_problem``: its records (``errors``:
    the catalog's), a default that names no record, a default refused everywhere, or a default
    no replica serves (yet)."""
    problems = dict(errors)
    for entry in entries:
        problem = entry.default_problem()
        if problem is None:
            problem = decision.refused.get(entry.name) or _not_served(entry, registrations)
        if problem:
            problems.setdefault(entry.name, problem)
    return problems


def _not_served(entry: ModelEntry, registrations: Registrations) -> str:
    states = registrations.get((entry.name, entry.default_version or ""), {}).values()
    if any(state.state == REGISTERED for state in states):
        return ""
    why = next((state.error for state in states if state.error), "")
    return f"its default v{entry.default_version} is not loaded in TorchServe" + (
        f" ({why})" if why else ""
    )
