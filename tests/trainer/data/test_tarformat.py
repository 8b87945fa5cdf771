from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from tests.trainer.data.helpers import png
from trainer.data.decode import BadImage
from trainer.data.tarformat import ShardWriter, iter_members, iter_records, record_sample


def test_records_group_members_by_key() -> None:
    writer = ShardWriter()
    writer.add("00000001", "png", png(1), 0)
    writer.add("00000002", "jpeg", b"j", 3)
    records = list(iter_records(writer.finish()))
    assert records == [
        ("00000001", {"png": png(1), "cls": b"0"}),
        ("00000002", {"jpeg": b"j", "cls": b"3"}),
    ]


def _tar(fmt: int, names: list[str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            data = bytes([i % 256]) * (i * 300)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(fmt: int) -> None:
    names = ["a.png", "a.cls", "dir/b.jpg", "x" * 90 + "/" + "y" * 60 + ".cls"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["long/" * 40 + "c.png", "ünïcode/d.webp"]
    data = _tar(fmt, names)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(iter_members(data)) == expected


def test_tar_reader_reads_webdataset_writer_output(tmp_path: Path) -> None:
    path = tmp_path / "shard.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "s/000001", "png": png(1), "cls": 4})
        sink.write({"__key__": "s/000002", "png": png(2), "cls": 5})
    records = list(iter_records(path.read_bytes()))
    assert [key for key, _ in records] == ["s/000001", "s/000002"]
    assert records[0][1] == {"png": png(1), "cls": b"4"}


def test_record_sample_needs_an_image_and_a_label() -> None:
    assert record_sample({"jpeg": b"j", "cls": b"2"}) == (b"j", 2)
    for broken in ({"cls": b"2"}, {"png": b"p"}, {"png": b"p", "cls": b"two"}):
        with pytest.raises(BadImage):
            record_sample(broken)


def _pax_member(header_payload: bytes) -> bytes:
    """A tar whose first member is a pax header holding ``header_payload``, then one file."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        pax = tarfile.TarInfo("././@PaxHeader")
        pax.type, pax.size = tarfile.XHDTYPE, len(header_payload)
        tar.addfile(pax, io.BytesIO(header_payload))
        info = tarfile.TarInfo("a.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"png"))
    return out.getvalue()


def test_pax_path_record_is_read() -> None:
    assert list(iter_members(_pax_member(b"16 path=b/c.png\n"))) == [("b/c.png", b"png")]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("payload", [b"0 path=x\n", b"3 path=x\n", b"99 path=x\n", b"zz y\n"])
def test_a_malformed_pax_record_is_an_error_not_an_endless_loop(payload: bytes) -> None:
    with pytest.raises(ValueError, match="malformed pax record"):
        list(iter_members(_pax_member(payload)))
