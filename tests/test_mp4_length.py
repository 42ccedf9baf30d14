"""A clip's length read from its MP4 header (moov/mvhd), on hand-built ISO-BMFF boxes."""

from __future__ import annotations

import struct
from decimal import Decimal

from renderqueue_pipeline.archive.mp4 import Mp4Duration, mp4_seconds
from renderqueue_pipeline.simulator.models import BLOCK, OutputFile, file_chunks, mp4_head


def box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def large_box(kind: bytes, body_size: int) -> bytes:
    """Only the header of a box with a 64-bit size (its body follows separately)."""
    return struct.pack(">I4sQ", 1, kind, 16 + body_size)


def mvhd_v0(timescale: int, duration: int) -> bytes:
    # version, flags, creation, modification, timescale, duration, then 80 bytes of the rest
    return box(b"mvhd", struct.pack(">B3xIIII", 0, 1, 2, timescale, duration) + bytes(80))


def mvhd_v1(timescale: int, duration: int) -> bytes:
    return box(b"mvhd", struct.pack(">B3xQQIQ", 1, 1, 2, timescale, duration) + bytes(80))


FTYP = box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2avc1mp41")


def feed_in_pieces(data: bytes, piece: int) -> Mp4Duration:
    reader = Mp4Duration()
    for i in range(0, len(data), piece):
        reader.feed(data[i : i + piece])
    reader.finish()
    return reader


def test_a_version_0_movie_header_gives_the_clip_length() -> None:
    data = FTYP + box(b"moov", mvhd_v0(1000, 8_008)) + box(b"mdat", bytes(5000))
    assert mp4_seconds(data) == (Decimal("8.008"), None)


def test_a_version_1_movie_header_gives_the_clip_length() -> None:
    data = FTYP + box(b"moov", mvhd_v1(90_000, 2**32 + 45_000)) + box(b"mdat", bytes(100))
    seconds, problem = mp4_seconds(data)
    assert problem is None
    assert seconds == (Decimal(2**32 + 45_000) / 90_000).quantize(Decimal("0.000001"))


def test_a_header_after_a_large_mdat_is_found_without_holding_the_media() -> None:
    """moov after mdat (no faststart), mdat with a 64-bit size, fed byte-odd chunks."""
    media = bytes(3 * BLOCK + 123)
    other = box(b"trak", bytes(40))
    data = FTYP + large_box(b"mdat", len(media)) + media + box(b"moov", other + mvhd_v0(600, 9000))
    for piece in (1, 7, 4096, len(data)):
        reader = feed_in_pieces(data, piece)
        assert (reader.seconds, reader.problem) == (Decimal(15), None), piece


def test_a_truncated_file_has_no_length_and_says_why() -> None:
    whole = FTYP + box(b"mdat", bytes(1000)) + box(b"moov", mvhd_v0(1000, 5000))
    seconds, problem = mp4_seconds(whole[:500])
    assert seconds is None
    assert problem is not None
    assert "truncated" in problem
    seconds, problem = mp4_seconds(whole[: len(whole) - 30])  # ends inside the mvhd
    assert seconds is None
    assert "ends inside" in problem


def test_files_that_state_no_length_have_a_reason() -> None:
    assert mp4_seconds(FTYP + box(b"mdat", bytes(10)))[1] == "no moov box in the file"
    assert mp4_seconds(FTYP + box(b"moov", box(b"trak", bytes(8))))[1] == (
        "moov box has no mvhd box"
    )
    assert mp4_seconds(FTYP + box(b"moov", mvhd_v0(0, 10)))[1] == "mvhd timescale is 0"
    assert mp4_seconds(FTYP + box(b"moov", mvhd_v0(1000, 0xFFFFFFFF)))[1] == (
        "mvhd states no duration"
    )
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100)
    seconds, problem = mp4_seconds(jpeg)
    assert seconds is None
    assert problem.startswith("not an MP4 file")


def test_the_simulators_clips_state_their_produced_length_even_at_a_gigabyte() -> None:
    for size, seconds in ((4096, 4.0), (2_500_000, 11.0), (1 << 30, 15.0), (5 << 30, 7.5)):
        file = OutputFile("abc123", "output.mp4", "video/mp4", size, seconds)
        reader = Mp4Duration()
        for chunk in file_chunks(file, 0, BLOCK - 1):  # the first block is enough
            reader.feed(chunk)
        assert reader.done, size
        assert reader.seconds == Decimal(str(seconds)), size
        # and the header's mdat covers exactly the rest of the file
        head = mp4_head(file)
        mdat_at = head.index(b"mdat") - 4
        (small,) = struct.unpack(">I", head[mdat_at : mdat_at + 4])
        mdat_size = (
            small if small != 1 else struct.unpack(">Q", head[mdat_at + 8 : mdat_at + 16])[0]
        )
        assert mdat_at + mdat_size == size
