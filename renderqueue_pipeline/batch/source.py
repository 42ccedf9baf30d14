"""Prompt files (CSV, JSONL, Parquet) at an allowed fsspec URL, read as a stream of rows.

A source is checked against the allow-list (`check_source`) before anything is opened.
The file is fetched once, never loaded whole: streamed into a local copy while it is
hashed (sha256, the batch's identity, so a renamed or re-uploaded copy is recognised) and
checked to look like what its name says (a CSV is parsed strictly to its end), then the
copy is read row by row, so the rows submitted are exactly the bytes that were hashed.
Rows come out as `(line_no, {column: value})`; `line_no` is the physical line a CSV
record starts on (the header is line 1), the line of a JSONL object, or the 1-based
row number of a Parquet file.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import decimal
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any, cast
from urllib.parse import urlsplit

import fsspec
from fsspec.core import OpenFile

from renderqueue_pipeline.errors import RenderqueueError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
READ_BLOCK = 1 << 20
SNIFF_BYTES = 1 << 16
CSV_FIELD_LIMIT = 1 << 20  # a field this long is an error in the row, not in the file
#: The parser's own limit: a field past this cannot be held, and the file is refused.
CSV_PARSE_LIMIT = 64 << 20
LOCAL_PROTOCOLS = ("file", "local")
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


def _is_local(url: str) -> bool:
    return "://" not in url or url.split("://", 1)[0].lower() in LOCAL_PROTOCOLS


def _local_path(url: str) -> str:
    """A local URL's path as fsspec opens it (no percent-decoding: fsspec does none)."""
    return url.split("://", 1)[1] if "://" in url else url


def file_format(url: str) -> str:
    """csv, jsonl or parquet, from the name; PromptFileError for anything else.

    A remote URL's name is its path: `http://host/x#y.csv` or `...x?y.csv` is not a CSV.
    """
    path = _local_path(url) if _is_local(url) else urlsplit(url).path
    suffix = PurePosixPath(path).suffix.lower()
    try:
        return FORMATS[suffix]
    except KeyError:
        raise PromptFileError(
            url, f"unsupported file type {suffix or '(none)'!r}; expected .csv, .jsonl or .parquet"
        ) from None


def parse_prefixes(text: str) -> list[str]:
    """RENDERQUEUE_PROMPT_SOURCES: comma-separated URL prefixes (folders)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _folder(path: str) -> str:
    return path if path.endswith("/") else path + "/"


def _normal(url: str) -> tuple[str, str, str]:
    """(scheme, host, path) of a URL or a local path, for comparing with a prefix.

    PromptFileError for what no allow-list entry can vouch for: `..` segments, a query,
    a fragment or credentials in a remote URL.
    """
    if _is_local(url):
        path = _local_path(url)
        if not path.startswith("/"):
            path = os.path.abspath(os.path.expanduser(path))
        if ".." in PurePosixPath(path).parts:
            raise PromptFileError(url, "a source path must not contain '..'")
        # symlinks resolved: a link in the inbox must not reach a file outside it
        return "file", "", os.path.realpath(path)
    parts = urlsplit(url)
    if parts.query or parts.fragment or "#" in url or "?" in url:
        raise PromptFileError(url, "a source URL must not have a query or a fragment")
    if "@" in parts.netloc:
        raise PromptFileError(url, "a source URL must not carry credentials")
    if ".." in PurePosixPath(parts.path).parts:
        raise PromptFileError(url, "a source URL must not contain '..'")
    return parts.scheme.lower(), parts.netloc.lower(), parts.path or "/"


def check_source(url: str, prefixes: Sequence[str], *, allow_local: bool) -> None:
    """Refuse `url` unless it lies under one of `prefixes` (or is local and allowed).

    Called before anything is opened: the inbox's location and RENDERQUEUE_PROMPT_SOURCES
    are the prefixes; the CLI also allows local paths (its user can read them anyway).
    The launchpad's `file_url` gets no such exception.
    """
    scheme, host, path = _normal(url)
    if scheme == "file" and allow_local:
        return
    for prefix in prefixes:
        try:
            p_scheme, p_host, p_path = _normal(prefix)
        except PromptFileError:
            continue
        if (p_scheme, p_host) == (scheme, host) and path.startswith(_folder(p_path)):
            return
    raise PromptFileError(
        url,
        "not an allowed prompt source: put the file in the prompts inbox "
        "(RENDERQUEUE_PROMPTS_URL) or under a prefix listed in RENDERQUEUE_PROMPT_SOURCES",
    )


def _open(url: str) -> IO[bytes]:
    """Open for streaming reads, turning 'not found' into one line naming what is missing."""
    try:
        # fsspec.open is untyped (inferred as its file list): it returns one OpenFile
        return cast(OpenFile, fsspec.open(url, "rb")).open()
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
    except Exception:  # noqa: BLE001 # pragma: no cover - url_to_fs already worked once in _open
        return "no such file"
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"s3", "s3a", "gs", "gcs", "abfs", "az"}:
        bucket = path.split("/", 1)[0]
        try:
            bucket_exists = fs.exists(bucket)
        except Exception:  # noqa: BLE001 - any store's error: the message says "no such bucket"
            bucket_exists = False
        if not bucket_exists:
            return f"bucket {bucket!r} does not exist (or is not visible with these credentials)"
    return "no such file"


def inspect_file(url: str, copy_to: IO[bytes] | None = None) -> FileFacts:
    """Hash the file in one streaming pass and check that its bytes fit its format.

    With `copy_to` (a seekable binary file), the bytes are also written there and a CSV
    is parsed to its end, so a file that cannot be parsed whole is refused, naming the
    line, before any row is used; read the rows from that copy.
    """
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
            if copy_to is not None:
                copy_to.write(block)
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
    if copy_to is not None:
        copy_to.flush()
        if fmt == "csv":
            copy_to.seek(0)
            rows = _strict_csv_records(url, copy_to)
        copy_to.seek(0)
    return FileFacts(url, fmt, digest.hexdigest(), size, rows)


def _csv_reader(text: IO[str]) -> Any:
    """The one CSV dialect of both passes: strict (an unterminated quote is an error)."""
    csv.field_size_limit(CSV_PARSE_LIMIT)
    return csv.reader(text, strict=True)


def _strict_csv_records(url: str, stream: IO[bytes]) -> int:
    """Parse the whole CSV; PromptFileError naming the line a broken record starts on."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = _csv_reader(text)
    records = 0
    try:
        while True:
            line_no = reader.line_num + 1
            try:
                next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise PromptFileError(
                    url,
                    f"line {line_no}: the file cannot be parsed as CSV from here on ({exc}); "
                    "nothing was submitted (an unterminated quote?)",
                ) from None
            records += 1
    finally:
        text.detach()  # leave the copy open for the read pass
    return max(records - 1, 0)


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

    def __init__(self, url: str, fmt: str | None = None, stream: IO[bytes] | None = None) -> None:
        self.url = url
        self.format = fmt or file_format(url)
        self.columns: list[str] = []
        self._given = stream  # the local copy `inspect_file` made: read instead of `url`
        self._stream: IO[bytes] | None = None
        self._rows: Iterator[tuple[int, dict[str, Any]]] | None = None
        self._peeked: list[tuple[int, dict[str, Any]]] = []

    def __enter__(self) -> PromptReader:
        self._stream = self._given if self._given is not None else _open(self.url)
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
        if self._stream is not None and self._stream is not self._given:
            self._stream.close()
        self._stream = None

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        if self._rows is None:
            raise RuntimeError("use PromptReader as a context manager")
        while self._peeked:
            yield self._peeked.pop(0)
        yield from self._rows

    # -- formats ----------------------------------------------------------------------

    def _text(self) -> io.TextIOWrapper:
        # surrogateescape: a bad byte spoils its row only, never the whole stream
        if self._stream is None:
            raise RuntimeError("use PromptReader as a context manager")
        return io.TextIOWrapper(
            self._stream, encoding="utf-8-sig", errors="surrogateescape", newline=""
        )

    def _csv(self) -> Iterator[tuple[int, dict[str, Any]]]:
        text = self._text()
        reader = _csv_reader(text)
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
            if len(values) != width:
                yield (
                    line_no,
                    {
                        "__error__": RowDecodeError(
                            "(row)", f"{len(values)} fields but the header has {width}"
                        )
                    },
                )
                continue
            long = next((i for i, v in enumerate(values) if len(v) > CSV_FIELD_LIMIT), None)
            if long is not None:
                name = columns[long] or f"column {long + 1}"
                yield (
                    line_no,
                    {
                        "__error__": RowDecodeError(
                            name, f"{len(values[long]):,} characters; at most {CSV_FIELD_LIMIT:,}"
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
        import pyarrow as pa  # noqa: PLC0415 - pyarrow loads only for parquet files
        import pyarrow.parquet as pq  # noqa: PLC0415 - pyarrow loads only for parquet files

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
                try:
                    values = {
                        str(k).strip().lower(): _plain_value(v, str(k)) for k, v in row.items()
                    }
                except _Unconvertible as exc:
                    yield line_no, {"__error__": RowDecodeError(exc.column, exc.reason)}
                    continue
                yield line_no, values


class _Unconvertible(Exception):
    def __init__(self, column: str, reason: str) -> None:
        self.column, self.reason = column, reason


def _plain_value(value: Any, column: str = "(value)") -> Any:
    """An Arrow value as JSON can hold it: a decimal becomes an int or a float, a date or
    time its ISO text, a duration its seconds; nested values recursively."""
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise _Unconvertible(column, f"not a finite number: {value}")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        raise _Unconvertible(column, "binary data; expected text or a number")
    if isinstance(value, dict):
        return {str(k): _plain_value(v, column) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_value(v, column) for v in value]
    return value


@dataclass(frozen=True)
class RowDecodeError:
    """A row the reader could not turn into columns; the validator rejects it."""

    field: str
    reason: str
