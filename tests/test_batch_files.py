"""Prompt files read as streams of rows, row checks, and the inbox sensor's tick plan."""

from __future__ import annotations

import codecs
import json
import os
import time
from pathlib import Path

import pytest
from batch_helpers import SEEDANCE, write_csv, write_jsonl, write_parquet

from renderqueue_pipeline.batch.inbox import is_prompt_file, list_inbox, plan_tick
from renderqueue_pipeline.batch.rows import (
    MAX_PROMPT_CHARS,
    PromptRow,
    Rejection,
    RowDefaults,
    validate_row,
)
from renderqueue_pipeline.batch.source import PromptFileError, PromptReader, inspect_file


def read_all(path: Path) -> list[tuple[int, dict]]:
    with PromptReader(path.as_uri()) as reader:
        return list(reader)


def test_csv_rows_keep_their_physical_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    # a BOM, a quoted prompt spanning two lines, a blank line, Windows line endings
    text = 'Prompt,user_id\r\n"two\nlines",1\r\n\r\nthird,3\r\n'
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    assert read_all(path) == [
        (2, {"prompt": "two\nlines", "user_id": "1"}),
        (5, {"prompt": "third", "user_id": "3"}),
    ]


def test_jsonl_and_parquet_rows(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "user_id": 1, "seed": 3}, {"prompt": "b", "user_id": 2, "seed": 4}]
    assert read_all(write_jsonl(tmp_path / "p.jsonl", rows)) == [(1, rows[0]), (2, rows[1])]
    parquet = write_parquet(tmp_path / "p.parquet", rows * 10)  # several row groups
    read = read_all(parquet)
    assert [n for n, _ in read] == list(range(1, 21))
    assert read[0][1] == rows[0]
    assert read[19][1] == rows[1]


def test_a_file_is_hashed_by_content_not_name(tmp_path: Path) -> None:
    a = write_csv(tmp_path / "a.csv", [{"prompt": "x"}])
    b = tmp_path / "b.csv"
    b.write_bytes(a.read_bytes())
    assert inspect_file(a.as_uri()).sha256 == inspect_file(b.as_uri()).sha256
    assert inspect_file(a.as_uri()).rows_estimate == 1


FILE_ERRORS = [
    ("empty.csv", b"", "the file is empty"),
    ("blank.jsonl", b"\n\n  \n", "empty"),
    ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
    ("latin1.csv", "prompt\ncaf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("noprompt.csv", b"text,user_id\nhello,1\n", "no 'prompt' column (columns found: 'text'"),
    ("header.csv", b"prompt,user_id\n", "no rows after the header"),
    ("noprompt.jsonl", b'{"text": "a"}\n', "no 'prompt' column"),
    ("fake.parquet", b"prompt\nhello\n", "not a Parquet file"),
    ("notes.txt", b"prompt\nhello\n", "unsupported file type '.txt'"),
]


def _inspect_and_read(uri: str) -> None:
    """What a run does with a file: inspect it, then read every row."""
    inspect_file(uri)
    with PromptReader(uri) as reader:
        list(reader)


@pytest.mark.parametrize(("name", "content", "says"), FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_a_file_that_cannot_be_used_says_why(
    tmp_path: Path, name: str, content: bytes, says: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PromptFileError) as caught:
        _inspect_and_read(path.as_uri())
    assert says in str(caught.value)
    assert str(caught.value).startswith(path.as_uri())


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="no such file"):
        inspect_file((tmp_path / "gone.csv").as_uri())


DEFAULTS = RowDefaults(user_id=None, endpoint=SEEDANCE, inputs={"resolution": "720p"})
ROW_CASES = [
    ("missing prompt", {"prompt": ""}, "prompt", "missing or empty"),
    ("20,000-char prompt", {"prompt": "x" * 20_000}, "prompt", f"at most {MAX_PROMPT_CHARS:,}"),
    ("non-integer user", {"prompt": "a", "user_id": "seven"}, "user_id", "expected an integer"),
    ("fractional user", {"prompt": "a", "user_id": "7.5"}, "user_id", "expected an integer"),
    ("negative user", {"prompt": "a", "user_id": -3}, "user_id", "between 0 and"),
    ("no user, no default", {"prompt": "a"}, "user_id", "no default user"),
    ("bad bytes", {"prompt": "caf\udce9", "user_id": "1"}, "prompt", "not valid UTF-8"),
    ("NUL", {"prompt": "a\x00b", "user_id": "1"}, "prompt", "NUL"),
    ("seed text", {"prompt": "a", "user_id": "1", "seed": "lucky"}, "seed", "integer"),
]


@pytest.mark.parametrize(
    ("raw", "field", "says"), [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES]
)
def test_a_bad_row_is_rejected_with_its_field(raw: dict, field: str, says: str) -> None:
    rejected = validate_row(12, raw, DEFAULTS)
    assert isinstance(rejected, Rejection)
    assert (rejected.line_no, rejected.field) == (12, field)
    assert says in rejected.reason


def test_a_good_row_merges_defaults_and_types_csv_cells() -> None:
    row = validate_row(
        3,
        {
            "prompt": "a fox",
            "user_id": "42",
            "duration": "5",
            "generate_audio": "false",
            "seed": "9",
            "resolution": "",
            "endpoint": "",
        },
        DEFAULTS,
    )
    assert row == PromptRow(
        3,
        42,
        SEEDANCE,
        {
            "resolution": "720p",
            "prompt": "a fox",
            "duration": "5",
            "generate_audio": False,
            "seed": 9,
        },
    )
    # JSON numbers: a duration becomes fal's string enum
    assert (
        validate_row(1, {"prompt": "a", "user_id": 1, "duration": 8}, DEFAULTS).inputs["duration"]
        == "8"
    )


def test_inbox_ignores_hidden_partial_and_other_files() -> None:
    assert is_prompt_file("week48.csv")
    assert is_prompt_file("a/b/PROMPTS.JSONL")
    assert is_prompt_file("x.parquet")
    for name in (".week48.csv", "week48.csv.tmp", "week48.csv.part", "_tmp.csv", "a.txt", "a"):
        assert not is_prompt_file(name), name


def test_a_tick_requests_a_file_once_it_stood_still_for_a_tick(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    url = inbox.as_uri()
    first = write_csv(inbox / "a.csv", [{"prompt": "x"}])
    (inbox / "b.csv.part").write_text("prompt\nhalf")

    tick1 = plan_tick(list_inbox(url), None, 20)
    assert tick1.requests == []
    assert [f.path for f in tick1.waiting] == [str(first)]
    tick2 = plan_tick(list_inbox(url), tick1.cursor, 20)
    assert [f.path for f in tick2.requests] == [str(first)]
    assert tick2.requests[0].url == first.as_uri()
    # nothing new: nothing requested, and the cursor no longer lists the file
    tick3 = plan_tick(list_inbox(url), tick2.cursor, 20)
    assert tick3.requests == []
    assert tick3.considered == 0

    # a file being appended to keeps changing: it waits until it stops
    growing = inbox / "c.csv"
    growing.write_text("prompt\none\n")
    tick4 = plan_tick(list_inbox(url), tick3.cursor, 20)
    with growing.open("a") as f:
        f.write("two\n")
    later = time.time() + 5
    os.utime(growing, (later, later))
    tick5 = plan_tick(list_inbox(url), tick4.cursor, 20)
    assert tick5.requests == []
    tick6 = plan_tick(list_inbox(url), tick5.cursor, 20)
    assert [f.path for f in tick6.requests] == [str(growing)]


def test_a_tick_requests_at_most_its_cap_and_the_rest_next_time(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(5):
        write_csv(inbox / f"f{i}.csv", [{"prompt": f"x{i}"}])
    files = list_inbox(inbox.as_uri())
    tick1 = plan_tick(files, None, 2)
    tick2 = plan_tick(files, tick1.cursor, 2)
    tick3 = plan_tick(files, tick2.cursor, 2)
    tick4 = plan_tick(files, tick3.cursor, 2)
    tick5 = plan_tick(files, tick4.cursor, 2)
    requested = [f.path for t in (tick2, tick3, tick4, tick5) for f in t.requests]
    assert sorted(requested) == sorted(f.path for f in files)
    assert len(requested) == len(set(requested))
    assert all(len(t.requests) <= 2 for t in (tick1, tick2, tick3, tick4, tick5))
    assert len(json.loads(tick5.cursor)["files"]) == 0
