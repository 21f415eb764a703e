"""The conversation's image, as the base64 the Triton models take.

One concern: turning an OpenAI `image_url` into image bytes: a `data:image/...;base64,` URL's
payload, an `s3://` or `http(s)://` URL under a prefix of the server's fetch allow-list (read with a
size cap and a timeout, redirects not followed), or, for a chat without an image, a blank image of
CLIP's mean colour. Anything else is a 400 (`OpenAIError`) that names where the request has it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from sharegpt4v.redact import redact_text
from sharegpt4v.serving.openai_protocol import Image, OpenAIError, ServedModel, bad_request

# CLIP's mean colour (sharegpt4v.modeling.images.CLIP_MEAN x 255, rounded; that module imports torch,
# which this one must not): the blank image of a text-only chat. A test keeps the two equal.
BLANK_RGB = (123, 117, 104)
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL)


# the allow-list of image URLs the server may fetch ------------------------------------------------


def check_fetch_prefix(prefix: str) -> str:
    """An allow-list entry: `s3://bucket[/prefix]` or `http(s)://host[:port][/path]`; ValueError otherwise."""
    parts = urlsplit(prefix)
    if parts.scheme not in ("s3", "http", "https") or not parts.netloc or "@" in parts.netloc:
        raise ValueError(f"fetch allow-list entry {prefix!r}: expected s3://bucket/prefix or http(s)://host[:port]/path")
    if parts.query or parts.fragment:
        raise ValueError(f"fetch allow-list entry {prefix!r}: a prefix has no query or fragment")
    return prefix


def url_allowed(url: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    """Whether `url` lies under one of `prefixes`: same scheme and host:port exactly (a host name that
    merely starts like an allowed one does not count), a path that starts with the prefix's path, and
    no userinfo or `.`/`..` segments that could step out of it."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    if "@" in parts.netloc or "\\" in path or any(s in (".", "..") for s in path.split("/")):
        return False
    for prefix in prefixes:
        allowed = urlsplit(prefix)
        if (parts.scheme.lower(), parts.netloc.lower()) == (allowed.scheme.lower(), allowed.netloc.lower()) \
                and parts.path.startswith(allowed.path):
            return True
    return False


# the image, as base64 -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def blank_image_base64() -> str:
    """A PNG of CLIP's mean colour, base64: the image a text-only chat is asked about."""
    import io

    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.new("RGB", (64, 64), BLANK_RGB).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def data_url_payload(url: str, where: str) -> str:
    """The base64 payload of a `data:image/...;base64,` URL; 400 for any other data URL."""
    match = _DATA_URL.match(url)
    if match is None:
        raise bad_request(f"{where}: not a data URL (data:image/png;base64,...)", where, "invalid_image_url")
    mime = match["mime"].strip().lower()
    if not mime.startswith("image/"):
        raise bad_request(f"{where}: a data URL of type {mime or 'text/plain'!r} is not an image "
                          "(expected data:image/...;base64,...)", where, "invalid_image_format")
    if ";base64" not in match["params"].lower():
        raise bad_request(f"{where}: the data URL is not base64-encoded (expected data:{mime};base64,...)", where,
                          "invalid_image_url")
    payload = re.sub(r"\s", "", match["data"])
    if not payload:
        raise bad_request(f"{where}: the data URL carries no data", where, "invalid_image_url")
    return payload


def _read_s3(url: str, limit: int, where: str) -> bytes:
    """An allow-listed s3:// object (at most `limit` bytes); a store that is down is not the client's fault."""
    from sharegpt4v import storage

    try:
        store, key = storage.split(url)
        size = store.size(key)
        if size > limit:
            raise bad_request(f"{where}: {size} bytes is over the limit of {limit} bytes", where, "image_too_large")
        return store.get_bytes(key)
    except (storage.ObjectNotFound, storage.BucketNotFound, ValueError):
        raise bad_request(f"{where}: {redact_text(url)}: no such object", where, "invalid_image_url") from None
    except (storage.StoreUnavailable, storage.CredentialsError) as exc:
        raise OpenAIError(503, f"{where}: cannot read {redact_text(url)}: {redact_text(str(exc))}", param=where) from None
    except storage.StoreError as exc:
        raise bad_request(f"{where}: cannot read {redact_text(url)}: {redact_text(str(exc))}", where,
                          "invalid_image_url") from None


async def image_base64(image: Image | None, model: ServedModel, prefixes: tuple[str, ...], session: Any,
                       fetch_timeout_s: float) -> str:
    """The conversation's image as base64 for Triton: a data URL's payload, an allow-listed object or web
    image read here (size cap, timeout, no redirects), or the blank image when there is none."""
    if image is None:
        return blank_image_base64()
    url, where, limit = image.url, image.where, model.options.max_image_bytes
    if url.startswith("data:"):
        return data_url_payload(url, where)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("s3", "http", "https"):
        raise bad_request(f"{where}: unsupported URL; send a data URL (data:image/png;base64,...) or an s3:// or "
                          "http(s):// URL on this server's fetch allow-list", where, "invalid_image_url")
    if not url_allowed(url, prefixes):
        listed = ", ".join(prefixes) if prefixes else "nothing: send the image as a data URL"
        raise bad_request(f"{where}: {redact_text(url)} is not on this server's fetch allow-list ({listed})", where,
                          "image_url_not_allowed")
    if scheme == "s3":
        data = await asyncio.to_thread(_read_s3, url, limit, where)
    else:
        data = await _fetch_http(session, url, limit, where, fetch_timeout_s)
    return base64.b64encode(data).decode("ascii")


async def _fetch_http(session: Any, url: str, limit: int, where: str, fetch_timeout_s: float) -> bytes:
    import aiohttp

    shown = redact_text(url)
    try:
        async with session.get(url, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=fetch_timeout_s)) as r:
            if r.status != 200:
                extra = " (redirects are not followed)" if 300 <= r.status < 400 else ""
                raise bad_request(f"{where}: fetching {shown} answered HTTP {r.status}{extra}", where,
                                  "invalid_image_url")
            if r.content_length is not None and r.content_length > limit:
                raise bad_request(f"{where}: {r.content_length} bytes is over the limit of {limit} bytes", where,
                                  "image_too_large")
            data = bytearray()
            async for chunk in r.content.iter_chunked(1 << 16):
                data += chunk
                if len(data) > limit:
                    raise bad_request(f"{where}: over the limit of {limit} bytes", where, "image_too_large")
            return bytes(data)
    except asyncio.TimeoutError:
        raise bad_request(f"{where}: fetching {shown} took longer than {fetch_timeout_s:g} s", where,
                          "invalid_image_url") from None
    except aiohttp.ClientError as exc:
        raise bad_request(f"{where}: fetching {shown} failed ({type(exc).__name__})", where,
                          "invalid_image_url") from None
