"""Image parts of a request: OpenAI `image_url` parts and Anthropic `image` blocks.

Only inline images are taken: a `data:` URL (OpenAI) or a `base64` source (Anthropic).
The server reads no file and fetches no URL that a request names. Each image is bounded
before it is decoded: its base64 text by length, then its pixel count read from the file
header (Pillow opens lazily), so a small file that would decode to a huge bitmap is
refused too.
"""

import base64
import binascii
import io
from typing import Any, Dict

from . import limits
from .errors import RequestError

# OpenAI's `detail` -> the model's soft tokens per image (vision/prompt.py: 70 ... 1120).
DETAIL_SOFT_TOKENS = {"low": 70, "auto": 280, "high": 1120}


def _decode(data: Any, media_type: str, where: str, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise RequestError(f"{where}: the image data must be a base64 string.", param)
    if not media_type.startswith("image/"):
        raise RequestError(f"{where}: {media_type!r} is not an image type.", param)
    if len(data) > limits.MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise RequestError(
            f"{where}: the image is larger than {limits.MAX_IMAGE_BYTES} bytes.", param
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the image data is not valid base64.", param) from None
    _check_pixels(raw, where, param)
    return raw


def _check_pixels(raw: bytes, where: str, param: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:  # reads the header only
            w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(f"{where}: the image cannot be read (format unknown).", param) from None
    if w * h > limits.MAX_IMAGE_PIXELS:
        raise RequestError(
            f"{where}: the image is {w}x{h} pixels, more than {limits.MAX_IMAGE_PIXELS}.", param
        )


def openai_image(part: Dict[str, Any], where: str) -> Dict[str, Any]:
    """`{"type": "image_url", "image_url": {"url": "data:...", "detail": ...}}` -> an
    image part of `vision/prompt.py` (the file's bytes)."""
    spec = part.get("image_url")
    spec = {"url": spec} if isinstance(spec, str) else spec
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str):
        raise RequestError(f"{where}.image_url needs a url.", "messages")
    if not url.startswith("data:"):
        raise RequestError(
            f"{where}.image_url.url must be a data: URL with the image inline "
            "(data:image/png;base64,...); this server fetches nothing.",
            "messages",
        )
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError(f"{where}.image_url.url must be a base64 data: URL.", "messages")
    detail = spec.get("detail", "auto")
    if detail not in DETAIL_SOFT_TOKENS:
        raise RequestError(f"{where}.image_url.detail must be low, auto or high.", "messages")
    raw = _decode(data, head[: -len(";base64")], where, "messages")
    return {"type": "image", "image": raw, "max_soft_tokens": DETAIL_SOFT_TOKENS[detail]}


def anthropic_image(block: Dict[str, Any], where: str) -> Dict[str, Any]:
    """`{"type": "image", "source": {"type": "base64", "media_type", "data"}}` -> an image
    part of `vision/prompt.py`."""
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64":
        raise RequestError(
            f"{where}.source must be a base64 source with the image inline; this server "
            "fetches nothing (no url or file sources).",
            "messages",
        )
    media_type = source.get("media_type")
    if not isinstance(media_type, str):
        raise RequestError(f"{where}.source.media_type must be a string.", "messages")
    return {"type": "image", "image": _decode(source.get("data"), media_type, where, "messages")}
