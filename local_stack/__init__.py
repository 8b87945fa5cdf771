"""The local stack: ``make up`` / ``make down`` / ``make status`` run every component on this
machine without Docker (``launcher``, supervised by supervisord), ``torchserve`` runs a TorchServe
process with refit's configuration (also for tests and benchmarks), ``demo`` is ``make demo``."""
