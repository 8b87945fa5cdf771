"""Retraining jobs: durable records (``records``), the queue (``manager``) and its worker
(``queue_worker``), what a job does (``runner``: train, gate, publish) and the proto form
(``protos``)."""
