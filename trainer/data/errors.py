"""Errors a dataset raises before or during training. Every one carries ``.message``."""

from __future__ import annotations


class DatasetError(Exception):
    """Base class; ``message`` says what is wrong and what to do about it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DatasetNotFound(DatasetError):
    """The bucket or the prefix does not exist (no objects under it)."""


class EmptyDataset(DatasetError):
    """Objects exist but none is an image in a class folder (or the split is empty)."""


class TooFewClasses(DatasetError):
    """A classifier needs at least two classes."""


class TooManyBadImages(DatasetError):
    """More undecodable images than the configured fraction allows."""


class ReadFailed(DatasetError):
    """Reading an object failed past the retry budget, or a listed object vanished."""


class PackFormatError(DatasetError):
    """A packed dataset's index is unreadable or does not match the requested options."""


class ResumeMismatch(DatasetError):
    """A saved dataset state does not belong to this dataset (other data, seed or world size)."""
