"""The one package that talks to TorchServe, through its own gRPC APIs.

TorchServe may run as several replicas (``Targets``): one ``host:port``, a comma list of them, or
``dns:///name:port``, one name resolving to every replica (a Kubernetes headless Service).
Predicts are spread over the replicas in rotation by gRPC's own client-side load balancing
(round_robin), and gRPC retries a Predict that failed with UNAVAILABLE once, on another replica.
Management calls (register, set default, scale, unregister) go to every replica; the service's
reconciler also calls each replica on its own and decides which are in rotation.

Workers: a version may be registered with no worker (it then costs no worker process) and scaled
up when a Predict names it. TorchServe's gRPC API reads 0 workers as "unset" (its default, one),
so scaling down to 0 uses its REST management API, the one call that can express it; each
replica's REST address is optional (``Targets.rest``), and without it versions are not scaled down.

``targets`` says where the replicas are; ``client`` calls them. Channels are created once and
reused; every call has a deadline; TorchServe's failures become the service's domain errors here
and nowhere else.
"""

from refit.torchserve.client import (
    CallObserver,
    ModelNotLoaded,
    NoWorker,
    ReplicaClient,
    ServedVersion,
    TorchServeClient,
)
from refit.torchserve.targets import Replica, Targets, balanced_target, resolve_ipv4

__all__ = [
    "CallObserver",
    "ModelNotLoaded",
    "NoWorker",
    "Replica",
    "ReplicaClient",
    "ServedVersion",
    "Targets",
    "TorchServeClient",
    "balanced_target",
    "resolve_ipv4",
]
