"""The refit gRPC service (the front door): forwards predictions to TorchServe; no torch."""
