"""A version's lineage: one type, stored as JSON that old and new records both read."""

from __future__ import annotations

import json

from refit.lineage import Lineage, Parent
from refit.registry import VersionRecord

TRAINED = {  # a record's lineage as the trainer wrote it before Lineage was a type
    "backbone": "efficientnet_lite0",
    "start": "flowers:1",
    "parent": {"model": "flowers", "version": "1", "weights_key": "weights/flowers/a.pt"},
    "frozen_depth": 10,
    "dataset_uri": "s3://datasets/flowers",
    "dataset_objects": 120,
    "dataset_digest": "d" * 64,
    "weights_key": "weights/flowers/b.pt",
    "run_id": "job-1",
    "hyperparameters": {"epochs": 8, "augmentation": {"hflip": 0.5}},
    "base_version": "1",
    "created_by": "tests",
    "job_id": "job-1",
}


def _record(lineage: dict) -> bytes:
    record = {"model": "flowers", "version": "2", "archive_key": "archives/flowers/b.mar",
              "class_names": ["rose"], "lineage": lineage}  # fmt: skip
    return json.dumps(record).encode()


def test_an_old_record_reads_into_fields_and_writes_back_the_same_json() -> None:
    record = VersionRecord.from_json(_record(TRAINED))
    lineage = record.lineage
    assert lineage.parent == Parent("flowers", "1", "weights/flowers/a.pt")
    assert lineage.dataset_objects == 120 and lineage.frozen_depth == 10
    assert lineage.job_id == "job-1" and lineage.hyperparameters["epochs"] == 8
    assert json.loads(record.to_json())["lineage"] == TRAINED


def test_missing_keys_take_defaults_and_are_not_written() -> None:
    base = {"backbone": "efficientnet_lite0", "dataset_uri": "imagenet-1k (pretrained)",
            "weights_key": "weights/imagenet/x.pt"}  # fmt: skip
    lineage = VersionRecord.from_json(_record(base)).lineage
    assert lineage.job_id == "" and lineage.parent is None and lineage.hyperparameters == {}
    assert lineage.to_dict() == base
    assert VersionRecord.from_json(_record({})).lineage == Lineage()


def test_unknown_keys_are_kept_and_walked_for_object_keys() -> None:
    newer = {**TRAINED, "teacher": {"weights_key": "weights/teacher/t.pt"}}
    lineage = Lineage.from_dict(newer)
    assert lineage.extra == {"teacher": {"weights_key": "weights/teacher/t.pt"}}
    assert lineage.to_dict() == newer  # a newer refit's keys survive a rewrite
    assert {"weights/teacher/t.pt", "weights/flowers/a.pt"} <= set(lineage.strings())


def test_loosely_typed_numbers_are_read_as_their_field_types() -> None:
    lineage = Lineage.from_dict({"base_version": 3, "dataset_objects": "7"})
    assert lineage.base_version == "3" and lineage.dataset_objects == 7
