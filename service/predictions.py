"""Predict: validate the image, pick the model version, ask TorchServe, shape the answer."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from refit.errors import InvalidArgument
from refit.identifiers import check_model_name, check_version
from refit.torchserve import NoWorker, QueueFull, TorchServeClient
from service.catalog import ModelCatalog
from service.config import ServiceSettings
from service.images import inspect_image
from service.metrics import PREDICT_REFUSALS, PREDICTIONS
from service.workers import Workers

DEFAULT_TOP_K = 5
In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    index: int


@dataclass(frozen=True)
class PredictResult:
    model: str
    version: str
    predictions: list[Prediction]


class Predictor:
    def __init__(
        self,
        settings: ServiceSettings,
        catalog: ModelCatalog,
        torchserve: TorchServeClient,
        workers: Workers | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.torchserve = torchserve
        self.workers = workers or Workers(torchserve)

    def predict(
        self,
        image: bytes,
        model: str,
        version: str = "",
        top_k: int = 0,
        timeout_s: float | None = None,
    ) -> PredictResult:
        if not model:
            raise InvalidArgument("model is required, e.g. 'imagenet'; `refit models` lists them")
        check_model_name(model)
        if version:
            check_version(version)
        inspect_image(
            image,
            max_bytes=self.settings.max_image_bytes,
            max_pixels=self.settings.max_image_pixels,
        )
        record = self.catalog.resolve(model, version, wait_s=timeout_s)
        k = min(top_k or DEFAULT_TOP_K, len(record.class_names))
        answer = self._ask(model, record.version, image, k, timeout_s)
        if "error" in answer:
            raise InvalidArgument(f"image could not be decoded: {answer['error']}")
        PREDICTIONS.labels(model, record.version).inc()
        predictions = [
            Prediction(p["label"], p["score"], p["index"]) for p in answer["predictions"]
        ]
        return PredictResult(model, record.version, predictions)

    def _ask(self, model: str, version: str, image: bytes, k: int, timeout_s: float | None) -> dict:
        """TorchServe's answer, after starting a worker for the version if it has none (once
        more if TorchServe says it has none: another service scaled it down, or a restart).
        A full TorchServe queue is no missing worker: the caller backs off (QueueFull,
        RESOURCE_EXHAUSTED) and nothing is started."""
        start = time.monotonic()

        def left() -> float | None:
            return None if timeout_s is None else timeout_s - (time.monotonic() - start)

        try:
            with self.workers.serving(model, version, left()):
                try:
                    return self.torchserve.predict(model, version, image, k, left())
                except NoWorker:
                    self.workers.lost(model, version)
                    self.workers.ensure(model, version, left())
                    return self.torchserve.predict(model, version, image, k, left())
        except QueueFull:
            PREDICT_REFUSALS.labels("queue_full").inc()
            raise


def ordered_map(
    fn: Callable[[In], Out], items: Iterable[In], pool: ThreadPoolExecutor, window: int
) -> Iterator[Out]:
    """Applies ``fn`` to up to ``window`` items at once; yields results in input order.

    A reader thread pulls items, so a client that waits for each answer before sending the next
    item is served as promptly as one that sends everything up front. When the consumer stops
    (the client cancelled, the generator is closed), the reader stops too: it may be waiting
    for a slot that no result will ever free.
    """
    slots = threading.Semaphore(window)
    stopped = threading.Event()
    futures: queue.Queue[Future | BaseException | None] = queue.Queue()

    def read() -> None:
        try:
            for item in items:
                slots.acquire()
                if stopped.is_set():
                    return
                futures.put(pool.submit(fn, item))
        except BaseException as exc:
            futures.put(exc)
        futures.put(None)

    threading.Thread(target=read, daemon=True, name="ordered-map-reader").start()
    try:
        while (future := futures.get()) is not None:
            if isinstance(future, BaseException):
                raise future
            result = future.result()
            slots.release()
            yield result
    finally:
        stopped.set()
        slots.release(window)  # wakes a reader waiting for a slot: it sees `stopped`
