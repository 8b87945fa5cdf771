"""The one package that talks to TorchServe, through its own gRPC APIs.

TorchServe may run as several replicas (``Targets``): one ``host:port``, a comma list of them, or
``dns:///name:port``, one name resolving to every replica (a Kubernetes headless Service).
Predicts are spread over the replicas in rotation, round robin, each replica on channels of its
own; a Predict that a replica cannot take (UNAVAILABLE) goes to the next one, once. Management
calls (register, set default, scale, unregister) go to every replica; the service's reconciler
also calls each replica on its own and decides which are in rotation.

Keys: every TorchServe replica runs with its own token authorization (deploy/torchserve/
keeper.py), and every call carries that replica's key for its API (``keys``: where refit reads
them; a refused key is read again and the call retried once).

Workers: a version may be registered with no worker (it then costs no worker process) and scaled
up when a Predict names it. TorchServe's gRPC API reads 0 workers as "unset" (its default, one),
so scaling down to 0 uses its REST management API, the one call that can express it; each
replica's REST address is optional (``Targets.rest``), and without it versions are not scaled down.

Use: each replica's metrics API (``Targets.metrics``, optional) exports its frontend counter
``ts_inference_requests_total`` per model and version, which every caller's requests move;
``inference_counts`` reads every replica's, all or none (the service judges idle versions from
them). TorchServe 0.12 answers "has no worker" both when a version runs no worker and when its
job queue is full; a Predict so refused asks the replica that refused it for the version's
workers: a worker there means the queue (``QueueFull``, RESOURCE_EXHAUSTED), else
``NoWorker``.

``targets`` says where the replicas are, ``keys`` with which keys they are called, ``replica``
calls one, ``client`` all of them; ``calls`` turns TorchServe's failures into refit's domain
errors, here and nowhere else; ``counters`` reads its inference counters. Channels are created
once and reused; every call has a deadline.
"""

from refit.torchserve.calls import CallObserver, KeyRefused, ModelNotLoaded, NoWorker, QueueFull
from refit.torchserve.client import TorchServeClient
from refit.torchserve.keys import FileKeys, Keys, KeySource, KeysUnavailable, NoKeys, StoreKeys
from refit.torchserve.replica import ReplicaClient, ServedVersion
from refit.torchserve.targets import Replica, Targets, resolve_ipv4

__all__ = [
    "CallObserver",
    "FileKeys",
    "KeyRefused",
    "KeySource",
    "Keys",
    "KeysUnavailable",
    "ModelNotLoaded",
    "NoKeys",
    "NoWorker",
    "QueueFull",
    "Replica",
    "ReplicaClient",
    "ServedVersion",
    "StoreKeys",
    "Targets",
    "TorchServeClient",
    "resolve_ipv4",
]
