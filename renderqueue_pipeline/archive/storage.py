"""Where our copies live: any fsspec URL (`file://` by default, `s3://bucket/prefix`).

Objects are written under a staging prefix, checked, then moved to their final key, so
a reader never sees a partial object at `generations/YYYY/MM/<request_id>/<file name>`.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, cast

import fsspec
from fsspec.core import url_to_fs
from fsspec.spec import AbstractBufferedFile

STAGING = ".staging"
#: s3fs buffers one block per open upload: this bounds memory per concurrent copy.
UPLOAD_BLOCK_BYTES = 5 * 1024 * 1024

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(name: str | None, fallback: str) -> str:
    """A file name safe as the last part of a key: no folders, no dot-only names."""
    base = posixpath.basename((name or "").replace("\\", "/"))
    base = _UNSAFE.sub("_", base).strip("._")[:120]
    return base or fallback


@dataclass
class ArchiveStorage:
    """An fsspec file system and the root path under it."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str

    @classmethod
    def from_url(cls, url: str, **storage_options: Any) -> ArchiveStorage:
        fs, root = url_to_fs(url, **storage_options)
        return cls(url, fs, root.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def final_path(self, created_at: datetime, request_id: str, file_name: str) -> str:
        return (
            f"{self.root}/generations/{created_at:%Y}/{created_at:%m}/"
            f"{safe_file_name(request_id, 'request')}/{file_name}"
        )

    def staging_path(self, request_id: str, file_name: str) -> str:
        token = f"{safe_file_name(request_id, 'request')}.{uuid.uuid4().hex[:12]}"
        return f"{self.root}/{STAGING}/{token}/{file_name}"

    @property
    def completes_uploads(self) -> bool:
        """Object stores where a multipart upload stays invisible until it is completed."""
        return bool({"s3", "s3a"} & set(_protocols(self.fs)))

    def begin(self, request_id: str, final: str) -> Upload:
        """An upload for `final` that nobody sees until `commit()`."""
        if self.completes_uploads:
            return CompletedUpload(self, final)
        return StagedUpload(self, self.staging_path(request_id, posixpath.basename(final)), final)

    def size(self, path: str) -> int:
        return int(self.fs.info(path)["size"])

    def move(self, source: str, target: str) -> None:
        """Make the staged object visible under its final key (a rename on local disks)."""
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        self.fs.mv(source, target)

    def discard(self, path: str) -> None:
        """Remove a staged object (and its staging folder on local disks); never raises."""
        with contextlib.suppress(Exception):
            if self.fs.exists(path):
                self.fs.rm(path)
        if self.is_local:
            with contextlib.suppress(Exception):
                self.fs.rmdir(posixpath.dirname(path))

    def url_of(self, path: str) -> str:
        """The full URL of a path (`file:///...`, `s3://bucket/key`)."""
        return self.fs.unstrip_protocol(path)

    def link(self, archive_url: str, expires_seconds: int = 3600) -> str:
        """What a user opens: a presigned URL on S3, a local path for file://."""
        if archive_url.startswith(self.fs.unstrip_protocol(self.root)):
            # a str for a str (typed str | list, as it also takes a list)
            fs, path = self.fs, cast(str, self.fs._strip_protocol(archive_url))
        else:
            fs, path = url_to_fs(archive_url)
        if "file" in _protocols(fs):
            return path
        return fs.sign(path, expiration=expires_seconds)


class StorageError(Exception):
    """The storage did not keep what we wrote."""


class StagedUpload:
    """Written under the staging prefix, checked, then moved (a rename on local disks)."""

    def __init__(self, storage: ArchiveStorage, staging: str, final: str) -> None:
        self.storage, self.staging, self.final = storage, staging, final
        if storage.is_local:
            storage.fs.makedirs(posixpath.dirname(staging), exist_ok=True)
        # binary mode: fsspec opens a byte stream (typed by its text-mode branch)
        self._sink = cast(IO[bytes], storage.fs.open(staging, "wb"))

    def write(self, data: bytes) -> None:
        self._sink.write(data)

    def seal(self, written: int) -> None:
        """Close the staged object and check its stored size against the bytes written."""
        self._sink.close()
        stored = self.storage.size(self.staging)
        if stored != written:
            raise StorageError(f"{self.staging}: stored {stored} bytes, wrote {written}")

    def commit(self) -> None:
        self.storage.move(self.staging, self.final)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._sink.close()
        self.storage.discard(self.staging)


class CompletedUpload:
    """A multipart upload to the final key: S3 shows no object until it is completed, and
    it is completed only after every check passed (no server-side copy of the bytes)."""

    def __init__(self, storage: ArchiveStorage, final: str) -> None:
        self.storage, self.final = storage, final
        # an object store opens fsspec's buffered file: discard() aborts the multipart upload
        self._sink = cast(
            AbstractBufferedFile, storage.fs.open(final, "wb", block_size=UPLOAD_BLOCK_BYTES)
        )
        self._written = 0

    def write(self, data: bytes) -> None:
        self._sink.write(data)

    def seal(self, written: int) -> None:
        self._written = written

    def commit(self) -> None:
        self._sink.close()  # completes the multipart upload (or one PUT for a small object)
        stored = self.storage.size(self.final)
        if stored != self._written:
            self.storage.discard(self.final)
            raise StorageError(f"{self.final}: stored {stored} bytes, wrote {self._written}")

    def abort(self) -> None:
        if self._sink.closed:
            return
        with contextlib.suppress(Exception):
            self._sink.discard()  # aborts the multipart upload; nothing was ever visible
        self._sink.closed = True  # never completed later (close() on garbage collection)


Upload = StagedUpload | CompletedUpload


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
