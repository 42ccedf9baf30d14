"""S3 through s3fs against moto's S3 server, and `renderqueue link` for both storages."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from archive_helpers import Behaviour, completed_row, images, media_server, media_sha256, row, video
from click.testing import CliRunner
from s3_helpers import s3_client

from renderqueue_pipeline.archive import ArchiveOptions, ArchiveStorage, archive_pending, links
from renderqueue_pipeline.archive.fetch import FetchPolicy, parse_hosts
from renderqueue_pipeline.cli import main
from renderqueue_pipeline.db.connect import connect

BUCKET = "rq-archive"


@pytest.fixture
def s3_env(s3_env: str) -> Iterator[str]:
    """conftest's s3_env plus a fresh bucket, emptied and removed afterwards."""
    s3 = s3_client(s3_env)
    s3.create_bucket(Bucket=BUCKET)
    yield s3_env
    listing = s3.list_objects_v2(Bucket=BUCKET)
    for item in listing.get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    s3.delete_bucket(Bucket=BUCKET)


@pytest.fixture
def origin():
    with media_server("127.0.0.1") as server:
        yield server


def _s3_keys(endpoint: str) -> list[str]:
    s3 = s3_client(endpoint)
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_archive_into_s3_and_link_to_a_presigned_url(
    conn, ledger_url, origin, s3_env, ledger_env, settings_env
) -> None:
    size = 12 * 1024 * 1024 + 5  # several multipart blocks
    rid = completed_row(conn, video(origin.serve("/s3/output.mp4", Behaviour(size=size)), size))
    cut = completed_row(
        conn,
        video(
            origin.serve("/s3/cut.mp4", Behaviour(size=size, disconnect_after=9 * 1024 * 1024)),
            size,
        ),
    )
    storage = ArchiveStorage.from_url(f"s3://{BUCKET}/prod")
    storage.fs.invalidate_cache()
    policy = FetchPolicy(loopback_hosts=parse_hosts(origin.netloc))
    report = archive_pending(lambda: connect(ledger_url), storage, policy, ArchiveOptions())
    assert report.archived == 1
    assert report.retrying == 1

    r = row(conn, rid)
    created = r["created_at"]
    key = f"prod/generations/{created:%Y}/{created:%m}/{rid}/output.mp4"
    assert r["archive_url"] == f"s3://{BUCKET}/{key}"
    assert r["archive_sha256"] == media_sha256("/s3/output.mp4", size)
    assert row(conn, cut)["archive_status"] == "pending"
    assert _s3_keys(s3_env) == [key]  # the broken upload left nothing behind

    (url,) = links(conn, rid, storage, expires_seconds=600)
    assert url.startswith(s3_env)
    assert "Signature=" in url
    body = httpx.get(url, timeout=30).content

    assert hashlib.sha256(body).hexdigest() == r["archive_sha256"]

    settings_env(RENDERQUEUE_STORAGE_URL=f"s3://{BUCKET}/prod")
    result = CliRunner().invoke(main, ["link", rid, "--expires", "120"])
    assert result.exit_code == 0, result.output
    presigned = httpx.URL(result.output.strip())
    expires = presigned.params.get("Expires") or presigned.params.get("X-Amz-Expires")
    lifetime = int(expires) - time.time() if "Expires" in presigned.params else int(expires)
    assert 60 < lifetime <= 121
    assert httpx.get(presigned, timeout=30).status_code == 200


def test_an_output_on_s3_is_archived_whole_or_not_at_all(conn, ledger_url, origin, s3_env) -> None:

    a = origin.serve("/s3w/1/image.jpeg", Behaviour(size=6 * 1024 * 1024))
    b = origin.serve("/s3w/2/image.jpeg", Behaviour(size=4000, status=503), Behaviour(size=4000))
    rid = completed_row(conn, images((a, 6 * 1024 * 1024), (b, 4000)))
    storage = ArchiveStorage.from_url(f"s3://{BUCKET}/whole")
    policy = FetchPolicy(loopback_hosts=parse_hosts(origin.netloc))
    report = archive_pending(lambda: connect(ledger_url), storage, policy, ArchiveOptions())
    assert report.retrying == 1
    assert _s3_keys(s3_env) == []  # the first image's upload was never completed
    conn.execute(
        "update generations set archive_next_attempt_at = now() where request_id = %s", (rid,)
    )
    conn.commit()
    archive_pending(lambda: connect(ledger_url), storage, policy, ArchiveOptions())
    assert row(conn, rid)["archive_status"] == "archived"
    assert [k.rsplit("/", 1)[1] for k in _s3_keys(s3_env)] == ["1-image.jpeg", "2-image.jpeg"]


def test_link_for_file_storage_and_for_rows_without_a_copy(
    conn, ledger_url, origin, ledger_env, tmp_path, settings_env
) -> None:
    archive_root = tmp_path / "files"
    settings_env(RENDERQUEUE_STORAGE_URL=f"file://{archive_root}")
    done = completed_row(conn, video(origin.serve("/l/output.mp4", Behaviour(size=64)), 64))
    lost = completed_row(conn, video(origin.serve("/l/gone.mp4", Behaviour(status=404)), 64))
    waiting = completed_row(conn, video(origin.url("/l/not-yet.mp4"), 64))
    storage = ArchiveStorage.from_url(f"file://{archive_root}")
    policy = FetchPolicy(loopback_hosts=parse_hosts(origin.netloc))
    archive_pending(lambda: connect(ledger_url), storage, policy, ArchiveOptions(limit=2))
    assert row(conn, waiting)["archive_status"] == "pending"

    runner = CliRunner()
    result = runner.invoke(main, ["link", done])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    assert path.is_file()
    assert path.read_bytes()[:4]
    assert path.stat().st_size == 64
    assert str(path).startswith(str(archive_root))

    for rid, words in (
        (lost, "archive_status=lost"),
        (waiting, "archive_status=pending"),
        ("no-such-request", "no such generation"),
    ):
        result = runner.invoke(main, ["link", rid])
        assert result.exit_code == 2
        assert words in result.output
        assert rid in result.output
        assert len(result.output.strip().splitlines()) == 1
