"""What a simulated model accepts and what it produces.

Video endpoints follow Seedance 2.0's inputs; image endpoints (so fal-client's own
README example, `fal-ai/fast-sdxl`, runs unchanged) return an `images` list.
Endpoint ids are data: any `owner/app[/subpath]` is accepted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

RESOLUTIONS: dict[str, tuple[int, int]] = {
    "480p": (854, 480),
    "720p": (1280, 720),
    "1080p": (1920, 1080),
}
#: Rough H.264 bitrates (bits per second) so file sizes look like real outputs.
BITRATES = {"480p": 1_200_000, "720p": 2_500_000, "1080p": 5_000_000}
ASPECT_RATIOS = {"auto", "21:9", "16:9", "4:3", "1:1", "3:4", "9:16"}
_IMAGE_HINTS = ("sdxl", "flux", "text-to-image", "image-to-image", "stable-diffusion", "imagen")


def is_image_endpoint(endpoint: str) -> bool:
    """Image models return `images`; everything else is treated as text/image-to-video."""
    lowered = endpoint.lower()
    return "video" not in lowered and any(hint in lowered for hint in _IMAGE_HINTS)


def _error(loc: str, msg: str, kind: str, value: Any = None) -> dict[str, Any]:
    item: dict[str, Any] = {"loc": ["body", loc], "msg": msg, "type": kind}
    if value is not None:
        item["input"] = value
    return item


def validate_inputs(endpoint: str, inputs: Any) -> list[dict[str, Any]]:
    """FastAPI-style 422 `detail` items for inputs the model would reject (empty if fine)."""
    if not isinstance(inputs, dict):
        return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]
    errors: list[dict[str, Any]] = []
    prompt = inputs.get("prompt")
    if prompt is None:
        errors.append(_error("prompt", "Field required", "missing"))
    elif not isinstance(prompt, str) or not prompt.strip():
        errors.append(_error("prompt", "Prompt must be a non-empty string", "value_error", prompt))
    if is_image_endpoint(endpoint):
        return errors
    if "duration" in inputs and parse_duration(inputs["duration"]) is None:
        errors.append(
            _error(
                "duration",
                "Input should be 'auto' or a whole number of seconds from 4 to 15",
                "enum",
                inputs["duration"],
            )
        )
    resolution = inputs.get("resolution", "720p")
    if resolution not in RESOLUTIONS:
        errors.append(
            _error("resolution", "Input should be '480p', '720p' or '1080p'", "enum", resolution)
        )
    aspect = inputs.get("aspect_ratio", "auto")
    if aspect not in ASPECT_RATIOS:
        errors.append(_error("aspect_ratio", "Unsupported aspect ratio", "enum", aspect))
    audio = inputs.get("generate_audio", True)
    if not isinstance(audio, bool):
        errors.append(_error("generate_audio", "Input should be a valid boolean", "bool_type"))
    seed = inputs.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        errors.append(_error("seed", "Input should be a valid integer", "int_type", seed))
    return errors


def parse_duration(value: Any) -> int | str | None:
    """'auto', or whole seconds 4..15 given as a string or an int; None when invalid."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value.strip().isdigit():
        seconds = int(value.strip())
    else:
        return None
    return seconds if 4 <= seconds <= 15 else None


@dataclass(frozen=True)
class OutputFile:
    """One output file on the simulated CDN."""

    file_id: str
    file_name: str
    content_type: str
    file_size: int


@dataclass(frozen=True)
class PlannedOutput:
    """What the model will return, decided at submit time from the request's own RNG."""

    file: OutputFile
    seed: int
    duration: float | None  # seconds of video; None for images
    width: int
    height: int
    billed_seconds: float | None

    def payload(self, url: str, prompt: str | None, inference_time: float) -> dict[str, Any]:
        """The model's output JSON, as the result endpoint and webhook carry it."""
        if self.duration is None:
            return {
                "images": [
                    {
                        "url": url,
                        "width": self.width,
                        "height": self.height,
                        "content_type": self.file.content_type,
                        "file_name": self.file.file_name,
                        "file_size": self.file.file_size,
                    }
                ],
                "seed": self.seed,
                "has_nsfw_concepts": [False],
                "prompt": prompt or "",
                "timings": {"inference": round(inference_time, 3)},
            }
        return {
            "video": {
                "url": url,
                "content_type": self.file.content_type,
                "file_name": self.file.file_name,
                "file_size": self.file.file_size,
                "duration": self.duration,
                "width": self.width,
                "height": self.height,
            },
            "seed": self.seed,
        }


def plan_output(
    endpoint: str, inputs: dict[str, Any], rng: random.Random, file_id: str, size_scale: float
) -> PlannedOutput:
    """Decide the output (duration, size, seed) deterministically from the request's RNG."""
    auto_seconds = rng.randint(4, 15)
    size_jitter = rng.uniform(0.85, 1.15)
    seed = inputs.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        seed = rng.randrange(2**31)
    if is_image_endpoint(endpoint):
        size = max(1024, int(180_000 * size_jitter * size_scale))
        file = OutputFile(file_id, "image.jpeg", "image/jpeg", size)
        return PlannedOutput(file, seed, None, 1024, 1024, None)
    duration = parse_duration(inputs.get("duration", "auto"))
    seconds = float(auto_seconds if duration in ("auto", None) else duration)
    resolution = inputs.get("resolution", "720p")
    width, height = RESOLUTIONS.get(resolution, RESOLUTIONS["720p"])
    if inputs.get("aspect_ratio") in ("9:16", "3:4"):
        width, height = height, width
    size = max(4096, int(BITRATES.get(resolution, BITRATES["720p"]) * seconds / 8 * size_jitter))
    size = max(4096, int(size * size_scale))
    file = OutputFile(file_id, "output.mp4", "video/mp4", size)
    return PlannedOutput(file, seed, seconds, width, height, seconds)


_MP4_HEADER = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41"
_JPEG_HEADER = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def file_chunks(file: OutputFile, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
    """Deterministic bytes of exactly `file.file_size`, starting with a real magic number.

    The stream is a function of the file id alone, so every download (and every
    restart of the simulator) returns identical bytes: archive checksums can be tested.
    """
    header = _MP4_HEADER if file.content_type == "video/mp4" else _JPEG_HEADER
    rng = random.Random(f"cdn:{file.file_id}")
    remaining = file.file_size
    first = header[:remaining]
    remaining -= len(first)
    body = rng.randbytes(min(chunk_size, remaining))
    remaining -= len(body)
    yield first + body
    while remaining > 0:
        body = rng.randbytes(chunk_size)[:remaining]
        remaining -= len(body)
        yield body
