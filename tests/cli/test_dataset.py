"""``refit dataset``: the commands users run, against a real S3 server and the FileStore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main
from refit.storage import S3Store
from tests.conftest import MotoServer
from tests.trainer.data.helpers import jpeg, png


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = moto_server.settings
    monkeypatch.setenv("MINIO_ENDPOINT", settings.endpoint)
    monkeypatch.setenv("MINIO_ACCESS_KEY", settings.access_key)
    monkeypatch.setenv("MINIO_SECRET_KEY", settings.secret_key)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for i in range(30):
        path = root / ["ant", "bee", "cow"][i % 3] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(i))
    (root / "bee" / "broken.jpg").write_bytes(jpeg(64)[:120])
    (root / "LICENSE").write_text("CC-BY")
    return root


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.usefixtures("s3_env")
def test_upload_twice_uploads_nothing_the_second_time(
    image_dir: Path, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run_json(capsys, "dataset", "upload", str(image_dir), f"s3://{bucket}/ds")
    assert (first["uploaded"], first["skipped"], first["ignored"]) == (31, 0, ["LICENSE"])
    second = run_json(capsys, "dataset", "upload", str(image_dir), f"s3://{bucket}/ds")
    assert (second["uploaded"], second["skipped"]) == (0, 31)
    assert main(["dataset", "upload", str(image_dir), f"s3://{bucket}/ds"]) == 0
    out = capsys.readouterr().out
    assert "uploaded 0 images" in out and "skipped  31" in out


@pytest.mark.usefixtures("s3_env")
def test_stats_text_and_json(
    image_dir: Path, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_json(capsys, "dataset", "upload", str(image_dir), f"s3://{bucket}/ds")
    stats = run_json(capsys, "dataset", "stats", f"s3://{bucket}/ds", "--val-fraction", "0")
    assert stats["class_names"] == ["ant", "bee", "cow"]
    assert stats["counts"]["train"] == {"ant": 10, "bee": 11, "cow": 10}
    assert stats["images"] == 31 and stats["bytes"] > 0
    assert [bad["key"] for bad in stats["bad"]] == ["ds/bee/broken.jpg"]

    assert main(["dataset", "stats", f"s3://{bucket}/ds"]) == 0
    out = capsys.readouterr().out
    assert "31 images" in out and "3 classes" in out
    assert "bad files: 1" in out and "ds/bee/broken.jpg: undecodable" in out
    for name in ("ant", "bee", "cow"):
        assert name in out


@pytest.mark.usefixtures("s3_env")
def test_pack_then_stats_shows_the_pack(
    image_dir: Path, bucket: str, capsys: pytest.CaptureFixture[str], moto_server: MotoServer
) -> None:
    run_json(capsys, "dataset", "upload", str(image_dir), f"s3://{bucket}/ds")
    src, dst = f"s3://{bucket}/ds", f"s3://{bucket}/packed"
    index = run_json(capsys, "dataset", "pack", src, dst, "--shard-samples", "8")
    assert index["class_names"] == ["ant", "bee", "cow"]
    total = sum(s["count"] for shards in index["splits"].values() for s in shards)
    assert total == 31
    store = S3Store(moto_server.settings)
    assert store.stat(bucket, "packed/train-000000.tar") is not None

    assert main(["dataset", "stats", f"s3://{bucket}/packed"]) == 0
    out = capsys.readouterr().out
    assert "packed from s3://" in out and "train" in out and "shards" in out


@pytest.mark.usefixtures("s3_env")
def test_errors_are_one_line_and_exit_1(bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dataset", "stats", f"s3://{bucket}/nothing-here"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("refit dataset stats: no objects under") and "Traceback" not in err
    assert main(["dataset", "upload", "/no/such/dir", f"s3://{bucket}/ds"]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_embedded_filestore_when_no_endpoint(
    image_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MINIO_ENDPOINT", "")
    monkeypatch.setenv("REFIT_DATA_DIR", str(tmp_path / "refit"))
    first = run_json(capsys, "dataset", "upload", str(image_dir), "s3://local/ds")
    assert first["uploaded"] == 31
    assert (tmp_path / "refit" / "objects" / "local" / "ds" / "ant" / "0.png").is_file()
    assert run_json(capsys, "dataset", "upload", str(image_dir), "s3://local/ds")["uploaded"] == 0
    stats = run_json(capsys, "dataset", "stats", "s3://local/ds", "--no-verify")
    assert stats["images"] == 31 and stats["bad"] is None
