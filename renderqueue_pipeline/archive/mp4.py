"""A clip's length from its MP4 header (the `mvhd` box), read while the archive streams it.

fal's documented Seedance output carries no duration, so an "auto" clip is priced at the
endpoint's default until fal bills it. The file itself says how long it is: the movie
header box (moov/mvhd) holds a timescale (units per second) and a duration in those units.
ISO-BMFF is a sequence of boxes (4-byte big-endian size, 4-byte type; size 1 = a 64-bit
size follows, size 0 = to the end of the file). `Mp4Duration` walks the boxes as bytes
arrive: it descends into `moov`, keeps only the `mvhd` box (at most 120 bytes) and skips
everything else without holding it, so a 1 GB `mdat` costs nothing whether `moov` comes
before it (faststart) or after it. No ffmpeg, no whole-file reads.
"""

from __future__ import annotations

import struct
from decimal import Decimal

#: mvhd's body is 100 bytes (version 0) or 112 (version 1); anything far larger is not one.
_MVHD_MAX = 256
_PRINTABLE = frozenset(range(0x20, 0x7F))


class Mp4Duration:
    """Feed a file's bytes in order; `seconds` or `problem` says what its header holds."""

    def __init__(self) -> None:
        self.position = 0  # bytes fed so far
        self.seconds: Decimal | None = None
        self.problem: str | None = None
        self._header = bytearray()  # an incomplete box header
        self._skip = 0  # bytes still to skip (the rest of a box we do not read)
        self._skip_to_end = False  # a size-0 box other than moov: the rest of the file
        self._mvhd: bytearray | None = None  # the mvhd body being collected
        self._mvhd_size = 0
        self._moov_end: int | None = None  # where the moov box we are inside ends
        self._seen_moov = False

    @property
    def done(self) -> bool:
        """True once the answer is known; later bytes change nothing."""
        return self.seconds is not None or self.problem is not None

    def feed(self, chunk: bytes) -> None:
        """Consume the next bytes of the file."""
        view = memoryview(chunk)
        while view and not self.done:
            if self._skip_to_end:
                self.position += len(view)
                return
            if self._skip:
                take = min(self._skip, len(view))
                self._skip -= take
                self.position += take
                view = view[take:]
                continue
            if self._mvhd is not None:
                take = min(self._mvhd_size - len(self._mvhd), len(view))
                self._mvhd += view[:take]
                self.position += take
                view = view[take:]
                if len(self._mvhd) == self._mvhd_size:
                    self._parse_mvhd(bytes(self._mvhd))
                continue
            if self._moov_end is not None and self.position >= self._moov_end:
                self.problem = "moov box has no mvhd box"
                return
            need = 8 if len(self._header) < 8 else 16
            take = min(need - len(self._header), len(view))
            self._header += view[:take]
            self.position += take
            view = view[take:]
            if len(self._header) < 8:
                continue
            if struct.unpack(">I", self._header[:4])[0] == 1 and len(self._header) < 16:
                continue  # a 64-bit size follows
            self._box(bytes(self._header))

    def _box(self, header: bytes) -> None:
        """A complete box header has arrived: decide what to do with the box's body."""
        size, kind = struct.unpack(">I4s", header[:8])
        header_size = 8
        if size == 1:
            size = struct.unpack(">Q", header[8:16])[0]
            header_size = 16
        self._header.clear()
        name = kind.decode("latin-1")
        if not set(kind) <= _PRINTABLE:
            self.problem = (
                f"not an MP4 file: box type {kind!r} at byte {self.position - header_size}"
            )
            return
        if size != 0 and size < header_size:
            self.problem = f"box {name!r} at byte {self.position - header_size} has size {size}"
            return
        body = None if size == 0 else size - header_size
        moov_end = self._moov_end
        inside = moov_end is not None
        if moov_end is not None and body is not None and self.position + body > moov_end:
            self.problem = f"box {name!r} runs past the end of moov"
            return
        if kind == b"moov" and not inside:
            self._seen_moov = True
            # its children follow; size 0: moov runs to the end of the file
            self._moov_end = 2**63 if body is None else self.position + body
            return
        if kind == b"mvhd" and self._moov_end is not None:
            if body is None or body > _MVHD_MAX or body < 20:
                self.problem = f"mvhd box has size {size}"
                return
            self._mvhd = bytearray()
            self._mvhd_size = body
            return
        if body is None:
            self._skip_to_end = True
        else:
            self._skip = body

    def _parse_mvhd(self, body: bytes) -> None:
        version = body[0]
        if version == 0 and len(body) >= 20:
            timescale, duration = struct.unpack(">II", body[12:20])
            unknown = duration == 0xFFFFFFFF
        elif version == 1 and len(body) >= 32:
            timescale, duration = struct.unpack(">IQ", body[20:32])
            unknown = duration == 0xFFFFFFFFFFFFFFFF
        else:
            self.problem = f"mvhd version {version} with {len(body)} bytes is not readable"
            return
        if timescale == 0:
            self.problem = "mvhd timescale is 0"
        elif unknown or duration == 0:
            self.problem = "mvhd states no duration"
        else:
            self.seconds = (Decimal(duration) / Decimal(timescale)).quantize(Decimal("0.000001"))

    def finish(self) -> Decimal | None:
        """The end of the file: the seconds, or None with `problem` saying why."""
        if not self.done:
            if self._header or self._mvhd is not None:
                self.problem = f"file ends inside a box header or mvhd at byte {self.position}"
            elif self._skip:
                self.problem = f"file truncated: {self._skip} bytes of a box missing"
            elif self._seen_moov:
                self.problem = "moov box has no mvhd box"
            else:
                self.problem = "no moov box in the file"
        return self.seconds


def mp4_seconds(data: bytes) -> tuple[Decimal | None, str | None]:
    """The duration a whole MP4 file's header states, or (None, the reason it cannot be read)."""
    reader = Mp4Duration()
    reader.feed(data)
    reader.finish()
    return reader.seconds, reader.problem


def is_video(content_type: str | None, file_name: str) -> bool:
    """Files whose length we measure: ISO-BMFF video (MP4 / QuickTime)."""
    if content_type:
        return content_type.split(";")[0].strip().lower() in (
            "video/mp4",
            "video/quicktime",
            "video/x-m4v",
        )
    return file_name.lower().endswith((".mp4", ".mov", ".m4v"))
