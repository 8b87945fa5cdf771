"""refit: serve fine-tuned image classifiers over gRPC and retrain them on demand.

This package holds what every component shares: the generated public API (``refit.v1``), the
object-store module, the model registry, the CLI and the local-stack launcher. It imports no torch.
"""
