"""The prompts inbox: list what is new and ready, decide what a sensor tick requests.

Listing only: nothing here opens a file (the run reads and hashes it). The rules:

- a file is considered when its name ends in .csv, .jsonl, .ndjson or .parquet and does
  not start with `.` or `_` (hidden or temporary) and does not end in .tmp/.part;
- a file must be seen unchanged (same version: etag, or size + mtime) on two ticks in a
  row before it is requested, so one still being written or uploaded is left alone;
- the cursor holds a watermark (change time, path) plus the versions of files after it,
  so a tick looks only at what changed since; a renamed file has a new change time (its
  ctime) and is requested again, and its run finds the batch of the same content and
  submits nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import fsspec

from renderqueue_pipeline.batch.source import FORMATS, PromptFileError, _missing_reason

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
MAX_REMEMBERED = 5000


@dataclass(frozen=True, order=True)
class InboxFile:
    """A candidate file: sortable by (changed, path), the cursor's order."""

    changed: float
    path: str
    version: str = field(compare=False)
    url: str = field(compare=False)
    size: int = field(compare=False, default=0)

    @property
    def run_key(self) -> str:
        return f"{self.path}@{self.version}"


def in_inbox(file_url: str, inbox_url: str) -> str:
    """A launchpad `file_url` as a URL: a bare name (`prompts-2026-12.csv`, or a path with
    no scheme that does not start with `/`) is a file in the prompts inbox; anything else
    is returned as given. The source allow-list checks the result either way."""
    if "://" in file_url or file_url.startswith("/"):
        return file_url
    return f"{inbox_url.rstrip('/')}/{file_url.removeprefix('./')}" if file_url else file_url


def is_prompt_file(name: str) -> bool:
    """True for a finished prompts file; False for hidden, temporary or other files."""
    base = PurePosixPath(name).name
    lowered = base.lower()
    if not base or base.startswith((".", "_", "~")) or lowered.endswith(IGNORED_SUFFIXES):
        return False
    return PurePosixPath(lowered).suffix in FORMATS


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _entry(fs: Any, info: dict[str, Any]) -> InboxFile:
    path = info["name"]
    size = int(info.get("size") or 0)
    modified = _timestamp(info.get("mtime")) or _timestamp(info.get("LastModified"))
    modified = modified or _timestamp(info.get("last_modified")) or 0.0
    created = _timestamp(info.get("created")) or 0.0  # local files: ctime, moved by a rename
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    version = etag or f"{size}-{modified:.6f}"
    return InboxFile(
        changed=max(modified, created),
        path=path,
        version=version,
        url=fs.unstrip_protocol(path),
        size=size,
    )


def list_inbox(url: str) -> list[InboxFile]:
    """Prompt files directly in the inbox folder, oldest change first."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:
        raise PromptFileError(url, f"not a usable fsspec URL: {exc}") from None
    try:
        fs.invalidate_cache(root)
        infos = fs.ls(root, detail=True)
    except FileNotFoundError:
        if fs.protocol in ("file", "local") or "file" in fs.protocol:
            raise PromptFileError(url, "the inbox folder does not exist") from None
        raise PromptFileError(url, _missing_reason(url)) from None
    except PermissionError as exc:
        raise PromptFileError(url, f"permission denied: {exc}") from None
    return sorted(
        _entry(fs, info)
        for info in infos
        if info.get("type") == "file" and is_prompt_file(info["name"])
    )


@dataclass
class TickPlan:
    """What one tick decided: files to request, the new cursor, and what waits."""

    requests: list[InboxFile]
    cursor: str
    waiting: list[InboxFile]
    considered: int


def plan_tick(files: list[InboxFile], cursor: str | None, max_requests: int) -> TickPlan:
    """Pick the ready new files (at most `max_requests`) and move the cursor past them.

    The watermark only passes files already requested, so a file still being written is
    looked at again next tick, and a file after it that was requested is remembered (by
    version) rather than requested twice.
    """
    state = json.loads(cursor) if cursor else {}
    after = tuple(state.get("after", (0.0, "")))
    seen: dict[str, list[Any]] = state.get("files", {})  # path -> [version, requested]
    new = [f for f in sorted(files) if (f.changed, f.path) > after]
    requests: list[InboxFile] = []
    waiting: list[InboxFile] = []
    remembered: dict[str, list[Any]] = {}
    watermark = after
    blocked = False
    for f in new:
        version, requested = seen.get(f.path, [None, False])
        if requested and version == f.version:
            remembered[f.path] = [f.version, True]
        elif version == f.version and len(requests) < max_requests:
            requests.append(f)
            remembered[f.path] = [f.version, True]
        else:
            # first sighting, changed since, or over this tick's cap: look again next tick
            if version != f.version:
                waiting.append(f)
            remembered[f.path] = [f.version, False]
            blocked = True
        if not blocked:
            watermark = (f.changed, f.path)
            remembered.pop(f.path, None)
    if len(remembered) > MAX_REMEMBERED:  # bounded cursor; the rest is seen again later
        remembered = dict(list(remembered.items())[:MAX_REMEMBERED])
    return TickPlan(
        requests=requests,
        cursor=json.dumps({"after": list(watermark), "files": remembered}, sort_keys=True),
        waiting=waiting,
        considered=len(new),
    )
