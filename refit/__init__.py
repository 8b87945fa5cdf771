"""refit: serve fine-tuned image classifiers over gRPC and retrain them on demand.

This package is the core every component shares: the generated public API (``refit.v1``), the
object stores, the model registry, identifiers, errors, tokens, logging and the TorchServe client.
It imports no torch. The applications built on it live beside it: ``service/`` (the front door),
``trainer/``, ``cli/`` (the ``refit`` command) and ``local_stack/`` (``make up`` without Docker).
"""
