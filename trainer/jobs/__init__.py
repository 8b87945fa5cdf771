"""Retraining jobs: durable records (``records``), the queue and its worker (``manager``), what a
job does (``runner``: train, gate, publish) and the proto form (``protos``)."""
