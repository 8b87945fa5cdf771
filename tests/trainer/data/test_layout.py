from __future__ import annotations

import pytest

from refit.storage import ObjectInfo, S3Uri
from trainer.data.errors import EmptyDataset, TooFewClasses
from trainer.data.layout import build_listing, hash_split, require_trainable

URI = S3Uri("b", "ds")


def infos(*keys: str) -> list[ObjectInfo]:
    return [ObjectInfo(key, 10, f"etag-{key}") for key in keys]


def test_classes_are_sorted_first_folders_and_nested_folders_belong_to_them() -> None:
    listing = build_listing(
        URI,
        infos("ds/zebra/a.jpg", "ds/ant/deep/er/b.PNG", "ds/ant/c.webp", "ds/moth/d.bmp"),
        val_fraction=0.0,
    )
    assert listing.class_names == ("ant", "moth", "zebra")
    labels = {s.key: s.label for s in listing.splits["train"]}
    assert labels == {
        "ds/ant/c.webp": 0,
        "ds/ant/deep/er/b.PNG": 0,
        "ds/moth/d.bmp": 1,
        "ds/zebra/a.jpg": 2,
    }


def test_stray_files_are_ignored_and_reported() -> None:
    keys = ("ds/README.md", "ds/top.jpg", "ds/cat/notes.txt", "ds/cat/.hidden.jpg", "ds/cat/a.jpeg")
    listing = build_listing(URI, infos(*keys), val_fraction=0.0)
    assert [s.key for s in listing.splits["train"]] == ["ds/cat/a.jpeg"]
    assert set(listing.ignored) == set(keys) - {"ds/cat/a.jpeg"}


def test_prefix_is_a_folder_not_a_string_prefix() -> None:
    listing = build_listing(S3Uri("b", "ds/"), infos("ds/cat/a.jpg", "ds/dog/b.jpg"), 0.0)
    assert listing.uri == S3Uri("b", "ds/")
    assert listing.class_names == ("cat", "dog")


def test_explicit_train_and_val_prefixes() -> None:
    listing = build_listing(
        URI,
        infos("ds/train/cat/1.jpg", "ds/train/dog/2.jpg", "ds/val/cat/3.jpg", "ds/val/bird/4.jpg"),
        val_fraction=0.5,
    )
    assert listing.split_mode == "prefix"
    assert listing.class_names == ("bird", "cat", "dog")
    assert [(s.key, s.label) for s in listing.splits["val"]] == [
        ("ds/val/bird/4.jpg", 0),
        ("ds/val/cat/3.jpg", 1),
    ]
    assert len(listing.splits["train"]) == 2


def test_hash_split_is_stable_as_the_dataset_grows_and_moves() -> None:
    small = [f"ds/c{i % 3}/{i}.jpg" for i in range(300)]
    grown = small + [f"ds/c{i % 3}/{i}.jpg" for i in range(300, 900)]
    before = build_listing(URI, infos(*small), 0.2)
    after = build_listing(URI, infos(*grown), 0.2)
    val_before = {s.key for s in before.splits["val"]}
    val_after = {s.key for s in after.splits["val"]}
    assert val_before == {k for k in val_after if k in set(small)}
    assert 0.12 < len(val_after) / 900 < 0.28
    moved_keys = (k.replace("ds/", "x/y/") for k in small)
    moved = build_listing(S3Uri("other", "x/y"), infos(*moved_keys), 0.2)
    assert {s.key.replace("x/y/", "ds/") for s in moved.splits["val"]} == val_before


def test_hash_split_fraction_edges() -> None:
    assert hash_split("cat/a.jpg", 0.0) == "train"
    assert hash_split("cat/a.jpg", 1.0) == "val"


def test_digest_covers_keys_and_etags() -> None:
    a = build_listing(URI, infos("ds/cat/a.jpg", "ds/dog/b.jpg"), 0.2)
    b = build_listing(URI, [*infos("ds/cat/a.jpg"), ObjectInfo("ds/dog/b.jpg", 10, "changed")], 0.2)
    c = build_listing(URI, infos("ds/dog/b.jpg", "ds/cat/a.jpg"), 0.2)
    assert len(a.digest) == 64
    assert a.digest != b.digest
    assert a.digest == c.digest


def test_require_trainable_errors_are_clear() -> None:
    with pytest.raises(EmptyDataset, match="no images") as err:
        require_trainable(build_listing(URI, infos("ds/notes.txt"), 0.2), "train")
    assert "1 other objects ignored" in err.value.message
    with pytest.raises(TooFewClasses, match="only one class"):
        require_trainable(build_listing(URI, infos("ds/cat/a.jpg", "ds/cat/b.jpg"), 0.2), "train")
    with pytest.raises(EmptyDataset, match="'val' split"):
        require_trainable(build_listing(URI, infos("ds/cat/a.jpg", "ds/dog/b.jpg"), 0.0), "val")
