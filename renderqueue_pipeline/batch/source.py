"""Prompt files (CSV, JSONL, Parquet) at any fsspec URL, read as a stream of rows.

A file is read twice, never loaded whole: once to hash it (sha256, the batch's identity,
so a renamed or re-uploaded copy is recognised) and to check that it looks like what its
name says, then once more row by row. Rows come out as `(line_no, {column: value})`;
`line_no` is the physical line a CSV record starts on (the header is line 1), the line of
a JSONL object, or the 1-based row number of a Parquet file.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

import fsspec

from renderqueue_pipeline.errors import RenderqueueError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
READ_BLOCK = 1 << 20
SNIFF_BYTES = 1 << 16
CSV_FIELD_LIMIT = 1 << 20  # a field this long is an error in the row, not in the file
PARQUET_BATCH_ROWS = 2048


class PromptFileError(RenderqueueError):
    """The file as a whole cannot be used (missing, empty, not text, no `prompt` column)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: {reason}")


@dataclass(frozen=True)
class FileFacts:
    """What the hashing pass learned about a file."""

    url: str
    format: str
    sha256: str
    size: int
    rows_estimate: int | None


def file_format(url: str) -> str:
    """csv, jsonl or parquet, from the name; PromptFileError for anything else."""
    suffix = PurePosixPath(url.split("?", 1)[0]).suffix.lower()
    try:
        return FORMATS[suffix]
    except KeyError:
        raise PromptFileError(
            url, f"unsupported file type {suffix or '(none)'!r}; expected .csv, .jsonl or .parquet"
        ) from None


def _open(url: str) -> IO[bytes]:
    """Open for streaming reads, turning 'not found' into one line naming what is missing."""
    try:
        return fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise PromptFileError(url, _missing_reason(url)) from None
    except PermissionError as exc:
        raise PromptFileError(url, f"permission denied: {exc}") from None
    except (OSError, ValueError) as exc:
        raise PromptFileError(url, f"cannot open: {type(exc).__name__}: {exc}") from None


def _missing_reason(url: str) -> str:
    """Tell a missing bucket from a missing file (object stores only)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except Exception:  # pragma: no cover - url_to_fs already worked once in _open
        return "no such file"
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"s3", "s3a", "gs", "gcs", "abfs", "az"}:
        bucket = path.split("/", 1)[0]
        try:
            bucket_exists = fs.exists(bucket)
        except Exception:
            bucket_exists = False
        if not bucket_exists:
            return f"bucket {bucket!r} does not exist (or is not visible with these credentials)"
    return "no such file"


def inspect_file(url: str) -> FileFacts:
    """Hash the file in one streaming pass and check that its bytes fit its format."""
    fmt = file_format(url)
    digest = hashlib.sha256()
    size = 0
    newlines = 0
    head = b""
    with _open(url) as stream:
        while block := stream.read(READ_BLOCK):
            if len(head) < SNIFF_BYTES:
                head += block[: SNIFF_BYTES - len(head)]
            digest.update(block)
            size += len(block)
            newlines += block.count(b"\n")
    if size == 0:
        raise PromptFileError(url, "the file is empty")
    if fmt == "parquet":
        if not head.startswith(b"PAR1"):
            raise PromptFileError(url, "not a Parquet file (no PAR1 magic at the start)")
        return FileFacts(url, fmt, digest.hexdigest(), size, None)
    _check_text(url, head, complete=size <= SNIFF_BYTES)
    if not head.removeprefix(codecs.BOM_UTF8).strip():
        raise PromptFileError(url, "the file is empty (no header, no rows)")
    lines = newlines + (0 if head.endswith(b"\n") and size <= SNIFF_BYTES else 1)
    rows = max(lines - 1, 0) if fmt == "csv" else lines
    return FileFacts(url, fmt, digest.hexdigest(), size, rows)


def _check_text(url: str, head: bytes, *, complete: bool) -> None:
    """A CSV or JSONL file is UTF-8 text: no NUL bytes, decodable (BOM allowed)."""
    nul = head.find(b"\x00")
    if nul >= 0:
        raise PromptFileError(
            url, f"not a text file (a NUL byte at offset {nul}); expected UTF-8 CSV or JSONL"
        )
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        truncated_tail = not complete and exc.start >= len(head) - 3
        if not truncated_tail:
            raise PromptFileError(
                url,
                f"not UTF-8 text (byte 0x{head[exc.start]:02x} at offset {exc.start}); "
                "save the file as UTF-8",
            ) from None


class PromptReader:
    """Rows of one prompt file; `columns` is known once opened (before any row is used).

    Use as a context manager. Iterating yields `(line_no, row)`, where a row maps the
    lower-cased column name to its value; a value the reader could not decode is kept
    as a `RowDecodeError` for the validator to reject with its line number.
    """

    def __init__(self, url: str, fmt: str | None = None) -> None:
        self.url = url
        self.format = fmt or file_format(url)
        self.columns: list[str] = []
        self._stream: IO[bytes] | None = None
        self._rows: Iterator[tuple[int, dict[str, Any]]] | None = None
        self._peeked: list[tuple[int, dict[str, Any]]] = []

    def __enter__(self) -> PromptReader:
        self._stream = _open(self.url)
        try:
            opener = {"csv": self._csv, "jsonl": self._jsonl, "parquet": self._parquet}
            self._rows = opener[self.format]()
            if self.format == "jsonl":  # columns are whatever the first object has
                first = next(self._rows, None)
                if first is not None:
                    self._peeked.append(first)
                    self.columns = list(first[1]) if isinstance(first[1], dict) else []
            if "prompt" not in self.columns:
                found = ", ".join(repr(c) for c in self.columns) or "none"
                raise PromptFileError(self.url, f"no 'prompt' column (columns found: {found})")
            if not self._peeked:
                first = next(self._rows, None)
                if first is None:
                    raise PromptFileError(self.url, "no rows after the header")
                self._peeked.append(first)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        assert self._rows is not None, "use PromptReader as a context manager"
        while self._peeked:
            yield self._peeked.pop(0)
        yield from self._rows

    # -- formats ----------------------------------------------------------------------

    def _text(self) -> io.TextIOWrapper:
        # surrogateescape: a bad byte spoils its row only, never the whole stream
        return io.TextIOWrapper(
            self._stream, encoding="utf-8-sig", errors="surrogateescape", newline=""
        )

    def _csv(self) -> Iterator[tuple[int, dict[str, Any]]]:
        csv.field_size_limit(CSV_FIELD_LIMIT)
        text = self._text()
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            raise PromptFileError(self.url, "the file is empty") from None
        except csv.Error as exc:
            raise PromptFileError(self.url, f"line 1: not a CSV header: {exc}") from None
        self.columns = [name.strip().lower() for name in header]
        duplicates = sorted({c for c in self.columns if c and self.columns.count(c) > 1})
        if duplicates:
            raise PromptFileError(self.url, f"duplicate columns in the header: {duplicates}")
        return self._csv_rows(reader, len(header))

    def _csv_rows(self, reader: Any, width: int) -> Iterator[tuple[int, dict[str, Any]]]:
        columns = self.columns
        while True:
            line_no = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise PromptFileError(self.url, f"line {line_no}: malformed CSV: {exc}") from None
            if not values or (len(values) == 1 and not values[0].strip()):
                continue  # blank line
            if len(values) > width:
                yield (
                    line_no,
                    {
                        "__error__": RowDecodeError(
                            "(row)", f"{len(values)} fields but the header has {width}"
                        )
                    },
                )
                continue
            yield line_no, {c: v for c, v in zip(columns, values, strict=False) if c}

    def _jsonl(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for line_no, line in enumerate(self._text(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, {"__error__": RowDecodeError("(row)", f"not valid JSON: {exc.msg}")}
                continue
            if not isinstance(value, dict):
                yield (
                    line_no,
                    {
                        "__error__": RowDecodeError(
                            "(row)", f"expected a JSON object, got {type(value).__name__}"
                        )
                    },
                )
                continue
            yield line_no, {str(k).strip().lower(): v for k, v in value.items()}

    def _parquet(self) -> Iterator[tuple[int, dict[str, Any]]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self._stream)
        except (pa.ArrowException, OSError) as exc:
            raise PromptFileError(self.url, f"not a readable Parquet file: {exc}") from None
        self.columns = [name.strip().lower() for name in parquet.schema_arrow.names]
        return self._parquet_rows(parquet)

    def _parquet_rows(self, parquet: Any) -> Iterator[tuple[int, dict[str, Any]]]:
        line_no = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                line_no += 1
                yield line_no, {str(k).strip().lower(): v for k, v in row.items()}


@dataclass(frozen=True)
class RowDecodeError:
    """A row the reader could not turn into columns; the validator rejects it."""

    field: str
    reason: str
