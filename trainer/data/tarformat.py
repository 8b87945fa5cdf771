"""WebDataset's tar layout: writing shards, and reading their records back.

A record is the run of consecutive members sharing a key (the path up to the first dot of the
file name): ``<key>.<ext>`` holds the image bytes as uploaded, ``<key>.cls`` the label as text.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterator

from trainer.data.decode import BadImage
from trainer.data.layout import IMAGE_EXTENSIONS

IMAGE_FIELDS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
Record = dict[str, bytes]  # extension -> bytes, as WebDataset groups tar members
BLOCK = 512  # tar header and padding unit
ZERO_BLOCK = bytes(BLOCK)


class ShardWriter:
    """Builds one tar in memory (shards are bounded in size) with reproducible headers."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        # Closed in finish(); a writer lives across many add() calls.
        self.tar = tarfile.open(  # noqa: SIM115
            fileobj=self.buffer, mode="w", format=tarfile.USTAR_FORMAT
        )
        self.count = 0

    def add(self, key: str, image_ext: str, image: bytes, label: int) -> None:
        self._member(f"{key}.{image_ext}", image)
        self._member(f"{key}.cls", str(label).encode())
        self.count += 1

    def size(self) -> int:
        return self.buffer.tell()

    def finish(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self.tar.addfile(info, io.BytesIO(data))


def iter_records(data: bytes) -> Iterator[tuple[str, Record]]:
    """Group consecutive members by key (path up to the first dot of the file name)."""
    current, record = None, {}
    for path, content in iter_members(data):
        folder, name = posixpath.split(path)
        stem, _, ext = name.partition(".")
        key = posixpath.join(folder, stem)
        if key != current and record:
            yield current, record
            record = {}
        current = key
        record[ext.lower()] = content
    if record:
        yield current, record


def iter_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Regular files of an uncompressed tar, in order.

    A minimal reader instead of ``tarfile``, which spent a quarter of the packed dataset's time
    parsing headers of these tiny members. Handles ustar names (with prefix), GNU long names and
    pax ``path`` records, i.e. what tarfile, GNU tar and webdataset's writer produce.
    """
    view, offset, long_name = memoryview(data), 0, None
    while offset + BLOCK <= len(data):
        header = view[offset : offset + BLOCK]
        if header[0] == 0 and bytes(header) == ZERO_BLOCK:
            return  # end-of-archive marker
        size = _octal(header[124:136])
        kind = bytes(header[156:157])
        start, offset = offset + BLOCK, offset + BLOCK + -(-size // BLOCK) * BLOCK
        content = bytes(view[start : start + size])
        if kind == b"L":
            long_name = content.rstrip(b"\0").decode()
        elif kind == b"x":
            long_name = _pax_path(content) or long_name
        elif kind in (b"0", b"\0", b"7"):
            yield long_name or _ustar_name(header), content
            long_name = None
        else:
            long_name = None  # directories, links, global headers: not samples


def _octal(field: memoryview) -> int:
    raw = bytes(field)
    if raw[0] == 0x80:  # GNU base-256, for sizes of 8 GiB and more
        return int.from_bytes(raw[1:], "big")
    text = raw.strip(b"\0 ")
    return int(text, 8) if text else 0


def _ustar_name(header: memoryview) -> str:
    name = bytes(header[0:100]).split(b"\0", 1)[0].decode()
    if bytes(header[257:262]) == b"ustar":
        prefix = bytes(header[345:500]).split(b"\0", 1)[0].decode()
        if prefix:
            return f"{prefix}/{name}"
    return name


def _pax_path(content: bytes) -> str | None:
    """Records are ``"<length> <key>=<value>\\n"``, the length counting the whole record."""
    position = 0
    while position < len(content):
        field = content[position:].split(b" ", 1)[0]
        length = int(field) if field.isdigit() else 0
        if length <= len(field) or position + length > len(content):
            # A zero or short length would never advance: a corrupt shard, not an endless loop.
            raise ValueError(f"malformed pax record at byte {position}: length {field[:20]!r}")
        key, _, value = content[position : position + length].partition(b" ")[2].partition(b"=")
        if key == b"path":
            return value[:-1].decode()
        position += length
    return None


def record_sample(record: Record) -> tuple[bytes, int]:
    """The image bytes and label of a record; a record without both is a bad image."""
    images = [ext for ext in record if ext in IMAGE_FIELDS]
    try:
        return record[images[0]], int(record["cls"])
    except (IndexError, KeyError, ValueError) as exc:
        raise BadImage("undecodable", f"record has fields {sorted(record)}") from exc
