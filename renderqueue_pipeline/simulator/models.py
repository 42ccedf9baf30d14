"""What each simulated endpoint accepts and what it produces: data per endpoint family.

Endpoint ids are data: an id is matched against `ENDPOINT_FAMILIES` (first match wins);
an id no family claims is a generic text-to-video model with Seedance's rules, or an
image model when it looks like one (so fal-client's README example, `fal-ai/fast-sdxl`,
runs unchanged).

Each family says where its input rules come from (`source`): "fal docs" when they were
checked against the endpoint's page on fal.ai (llms.txt input and output schemas),
"unconfirmed" when they were not. Outputs carry exactly the fields fal documents for the
endpoint; `extras=True` (the simulator's `output_extras` knob, off by default) adds
`duration`, `width` and `height` to a video, which fal does not send.

Durations are string enums on fal ("auto", "4".."15" for Seedance 2.0; "4s"/"6s"/"8s"
for Veo 3.1). fal's apps are Pydantic v2 models, and Pydantic v2 does not coerce an int
into a string enum, so an integer `duration` is a 422 here (not verified against fal
itself; see docs/simulator.md).
"""

from __future__ import annotations

import hashlib
import random
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

RESOLUTIONS: dict[str, tuple[int, int]] = {
    "480p": (854, 480),
    "720p": (1280, 720),
    "1080p": (1920, 1080),
    "4k": (3840, 2160),
}
#: Rough H.264 bitrates (bits per second) so file sizes look like real outputs.
BITRATES = {"480p": 1_200_000, "720p": 2_500_000, "1080p": 5_000_000, "4k": 16_000_000}
SEEDANCE_ASPECTS = ("auto", "21:9", "16:9", "4:3", "1:1", "3:4", "9:16")
SEEDANCE_DURATIONS = ("auto", *(str(s) for s in range(4, 16)))

Validation = Literal["submit", "run"]


@dataclass(frozen=True)
class EndpointFamily:
    """The input rules and output shape of a group of endpoints."""

    name: str
    pattern: str  # a regex matched (re.search) against the endpoint id
    kind: Literal["video", "image"] = "video"
    durations: tuple[str, ...] = ()  # accepted `duration` strings; () = no duration input
    default_duration: str | None = None
    auto_seconds: tuple[int, int] = (4, 15)  # what "auto" picks from
    resolutions: tuple[str, ...] = ()  # () = no resolution input (fixed `output_resolution`)
    default_resolution: str = "720p"
    aspect_ratios: tuple[str, ...] = ()
    validates_at: Validation = "submit"
    output_seed: bool = True  # the output carries `seed`
    source: str = "unconfirmed"
    notes: str = ""

    def matches(self, endpoint: str) -> bool:
        return re.search(self.pattern, endpoint.lower()) is not None


#: First match wins: specific families before general ones.
ENDPOINT_FAMILIES: tuple[EndpointFamily, ...] = (
    EndpointFamily(
        "seedance-2.0-fast",
        r"(^|/)seedance-2\.0/fast(/|$)",
        durations=SEEDANCE_DURATIONS,
        default_duration="auto",
        resolutions=("480p", "720p"),
        aspect_ratios=SEEDANCE_ASPECTS,
        source="fal docs (bytedance/seedance-2.0/fast/text-to-video llms.txt)",
        notes="480p/720p only",
    ),
    EndpointFamily(
        "seedance-2.0",
        r"(^|/)seedance-2\.0(/|$)",
        durations=SEEDANCE_DURATIONS,
        default_duration="auto",
        resolutions=("480p", "720p", "1080p"),
        aspect_ratios=SEEDANCE_ASPECTS,
        source="fal docs for durations and aspect ratios; 1080p on the standard tier unconfirmed",
    ),
    EndpointFamily(
        "veo3.1",
        r"(^|/)veo3(\.1)?(/|$)",
        durations=("4s", "6s", "8s"),
        default_duration="8s",
        resolutions=("720p", "1080p", "4k"),
        aspect_ratios=("16:9", "9:16"),
        validates_at="run",
        output_seed=False,
        source="fal docs (fal-ai/veo3.1 llms.txt); validation at run time unconfirmed",
    ),
    EndpointFamily(
        "kling-v2.5-turbo",
        r"kling-video/v2\.5-turbo/",
        durations=("5", "10"),
        default_duration="5",
        resolutions=(),
        default_resolution="1080p",
        aspect_ratios=("16:9", "9:16", "1:1"),
        validates_at="run",
        output_seed=False,
        source="unconfirmed (secondary sources)",
    ),
    EndpointFamily(
        "kling-v3",
        r"kling-video/(v3|o3)/",
        durations=tuple(str(s) for s in range(3, 16)),
        default_duration="5",
        resolutions=(),
        default_resolution="1080p",
        aspect_ratios=("16:9", "9:16", "1:1"),
        validates_at="run",
        output_seed=False,
        source="fal docs for v3 pro text-to-video; the turbo variant and run-time "
        "validation unconfirmed",
    ),
    EndpointFamily(
        "image",
        r"(sdxl|flux|text-to-image|image-to-image|stable-diffusion|imagen)",
        kind="image",
        source="fal docs for fal-ai/fast-sdxl's output; other image models unconfirmed",
    ),
)
GENERIC_VIDEO = EndpointFamily(
    "generic-video",
    r".",
    durations=SEEDANCE_DURATIONS,
    default_duration="auto",
    resolutions=("480p", "720p", "1080p"),
    aspect_ratios=SEEDANCE_ASPECTS,
    source="unconfirmed: an endpoint no family claims gets Seedance 2.0's rules",
)


def family_for(endpoint: str) -> EndpointFamily:
    """The family whose rules apply to `endpoint` (video ids never count as image models)."""
    lowered = endpoint.lower()
    for family in ENDPOINT_FAMILIES:
        if family.kind == "image" and "video" in lowered:
            continue
        if family.matches(lowered):
            return family
    return GENERIC_VIDEO


def is_image_endpoint(endpoint: str) -> bool:
    return family_for(endpoint).kind == "image"


def _error(loc: str, msg: str, kind: str, value: Any = None) -> dict[str, Any]:
    item: dict[str, Any] = {"loc": ["body", loc], "msg": msg, "type": kind}
    if value is not None:
        item["input"] = value
    return item


def _choices(values: tuple[str, ...]) -> str:
    quoted = [f"'{v}'" for v in values]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def validate_inputs(endpoint: str, inputs: Any) -> list[dict[str, Any]]:
    """FastAPI-style 422 `detail` items for inputs the endpoint rejects (empty if fine)."""
    if not isinstance(inputs, dict):
        return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]
    family = family_for(endpoint)
    errors: list[dict[str, Any]] = []
    prompt = inputs.get("prompt")
    if prompt is None:
        errors.append(_error("prompt", "Field required", "missing"))
    elif not isinstance(prompt, str) or not prompt.strip():
        errors.append(_error("prompt", "Prompt must be a non-empty string", "value_error", prompt))
    if family.kind == "image":
        return errors
    # an int is refused too: Pydantic v2 never turns 5 into "5" for a str enum
    for name, allowed in (
        ("duration", family.durations),
        ("resolution", family.resolutions),
        ("aspect_ratio", family.aspect_ratios),
    ):
        if allowed and name in inputs and inputs[name] not in allowed:
            message = f"Input should be {_choices(allowed)}"
            errors.append(_error(name, message, "enum", inputs[name]))
    audio = inputs.get("generate_audio", True)
    if not isinstance(audio, bool):
        errors.append(_error("generate_audio", "Input should be a valid boolean", "bool_type"))
    seed = inputs.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        errors.append(_error("seed", "Input should be a valid integer", "int_type", seed))
    return errors


def requested_seconds(family: EndpointFamily, inputs: dict[str, Any]) -> int | None:
    """Whole seconds the inputs ask for (None for "auto" or when unreadable)."""
    value = inputs.get("duration", family.default_duration)
    if not isinstance(value, str):
        return None
    text = value.strip().lower().removesuffix("s")
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class OutputFile:
    """One output file on the simulated CDN."""

    file_id: str
    file_name: str
    content_type: str
    file_size: int
    #: a video's length: its MP4 header (moov/mvhd) states it; None = no header duration
    seconds: float | None = None


@dataclass(frozen=True)
class PlannedOutput:
    """What the model will return, decided at submit time from the request's own RNG."""

    family: str
    kind: Literal["video", "image"]
    file: OutputFile
    seed: int
    duration: float | None  # seconds of video; None for images
    width: int
    height: int
    billed_seconds: float | None
    output_seed: bool = True

    def payload(
        self, url: str, prompt: str | None, inference_time: float, *, extras: bool = False
    ) -> dict[str, Any]:
        """The model's output JSON, as the result endpoint and webhook carry it.

        Exactly fal's documented fields; `extras` adds what fal does not send.
        """
        if self.kind == "image":
            image: dict[str, Any] = {
                "url": url,
                "width": self.width,
                "height": self.height,
                "content_type": self.file.content_type,
            }
            if extras:
                image.update(file_name=self.file.file_name, file_size=self.file.file_size)
            return {
                "images": [image],
                "timings": {"inference": round(inference_time, 3)},
                "seed": self.seed,
                "has_nsfw_concepts": [False],
                "prompt": prompt or "",
            }
        video: dict[str, Any] = {
            "url": url,
            "content_type": self.file.content_type,
            "file_name": self.file.file_name,
            "file_size": self.file.file_size,
        }
        if extras:
            video.update(duration=self.duration, width=self.width, height=self.height)
        body: dict[str, Any] = {"video": video}
        if self.output_seed:
            body["seed"] = self.seed
        return body


def file_id_for(request_id: str, index: int = 0) -> str:
    """A CDN path segment in fal's style (`files/b/<id>/<token>_<name>`), fixed per request."""
    digest = hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()
    return digest[:8]


def plan_output(
    endpoint: str, inputs: dict[str, Any], rng: random.Random, file_id: str, size_scale: float
) -> PlannedOutput:
    """Decide the output (duration, size, seed) deterministically from the request's RNG."""
    family = family_for(endpoint)
    auto_seconds = rng.randint(*family.auto_seconds)
    size_jitter = rng.uniform(0.85, 1.15)
    seed = inputs.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        seed = rng.randrange(2**31)
    if family.kind == "image":
        size = max(1024, int(180_000 * size_jitter * size_scale))
        file = OutputFile(file_id, "image.jpeg", "image/jpeg", size)
        return PlannedOutput(family.name, "image", file, seed, None, 1024, 1024, None)
    seconds = float(requested_seconds(family, inputs) or auto_seconds)
    resolution = inputs.get("resolution", family.default_resolution)
    if resolution not in RESOLUTIONS:
        resolution = family.default_resolution
    width, height = RESOLUTIONS[resolution]
    if inputs.get("aspect_ratio") in ("9:16", "3:4"):
        width, height = height, width
    size = max(4096, int(BITRATES[resolution] * seconds / 8 * size_jitter))
    size = max(4096, int(size * size_scale))
    file = OutputFile(file_id, "output.mp4", "video/mp4", size, seconds)
    return PlannedOutput(
        family.name, "video", file, seed, seconds, width, height, seconds, family.output_seed
    )


# ----- deterministic file bytes, generated on the fly and seekable ----------------------------

_MP4_HEADER = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41"
_JPEG_HEADER = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
BLOCK = 64 * 1024
#: the movie header's units per second (milliseconds, as most encoders write)
MP4_TIMESCALE = 1000


def mp4_moov(seconds: float, timescale: int = MP4_TIMESCALE) -> bytes:
    """A `moov` box holding one version-0 `mvhd` that states `seconds`."""
    mvhd_body = (
        struct.pack(">B3xIIII", 0, 0, 0, timescale, round(seconds * timescale))
        + struct.pack(">IH10x", 0x00010000, 0x0100)  # rate 1.0, volume 1.0, reserved
        + struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)  # unity matrix
        + bytes(24)  # pre_defined
        + struct.pack(">I", 2)  # next_track_ID
    )
    mvhd = struct.pack(">I4s", 8 + len(mvhd_body), b"mvhd") + mvhd_body
    return struct.pack(">I4s", 8 + len(mvhd), b"moov") + mvhd


def mp4_head(file: OutputFile) -> bytes:
    """The first bytes of a video file: ftyp, moov/mvhd (faststart), then mdat's header.

    `mdat` fills the rest of the file, so the file is valid ISO-BMFF at any size (a 64-bit
    mdat size past 4 GiB) and its header duration is the seconds the clip was produced with.
    """
    head = _MP4_HEADER
    if file.seconds is not None:
        head += mp4_moov(file.seconds)
    rest = file.file_size - len(head)
    if rest < 2**32:
        return head + struct.pack(">I4s", rest, b"mdat")
    return head + struct.pack(">I4sQ", 1, b"mdat", rest)


def _block(file: OutputFile, index: int) -> bytes:
    """Block `index` of the file's bytes (full BLOCK size; the caller trims the last one)."""
    data = random.Random(f"cdn:{file.file_id}:{file.file_size}:{index}").randbytes(BLOCK)
    if index == 0:
        header = mp4_head(file) if file.content_type == "video/mp4" else _JPEG_HEADER
        data = header + data[len(header) :]
    return data


def file_chunks(file: OutputFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes `start`..`end` (inclusive; default the whole file) of a file, block by block.

    A function of the file id and size alone, so every download (and every restart of the
    simulator) returns identical bytes, any range can be served without reading the ones
    before it, and nothing larger than one block is ever held in memory.
    """
    last = file.file_size - 1 if end is None else min(end, file.file_size - 1)
    position = start
    while position <= last:
        index, offset = divmod(position, BLOCK)
        take = min(BLOCK - offset, last - position + 1)
        yield _block(file, index)[offset : offset + take]
        position += take


def file_bytes(file: OutputFile) -> bytes:
    """The whole file at once (tests and small files only)."""
    return b"".join(file_chunks(file))
