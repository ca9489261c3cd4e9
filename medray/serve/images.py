"""Image intake for the chat API: a `data:` URL, an `s3://` URI inside the allowed prefixes,
a DICOMweb instance on an allowed server, or (only when enabled) an http(s) URL, read under the server's limits and then decoded by
`medray.data.load_image`. Every refusal is an ApiError that says what to fix."""

from __future__ import annotations

import base64
import binascii

from medray import storage
from medray.storage import dicomweb
from medray.config import StrictModel
from medray.data import ImageDecodeError, ImageOptions, load_image

from .config import ServeConfig
from .openai_api import ApiError


IMAGE_FETCH_S = 10.0  # an image from a PACS or the web: the request waits for it


class PreviewRequest(StrictModel):
    """The body of POST /v1/images/preview."""

    url: str
    """The image as a chat request sends it: a data: URL, or s3:// inside the allowed prefixes."""


def read_image(url: str, param: str, config: ServeConfig):
    """An image_url part as a decoded image, under the server's limits and S3 rules."""
    limits = config.limits
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "image data URLs must be base64 (data:image/png;base64,...)", param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image data URL is not valid base64", param=param) from None
        name = "data-url"
    elif url.startswith("s3://"):
        if not storage.within(url, config.allowed_s3_prefixes):
            raise ApiError(403, f"{url} is outside the allowed S3 prefixes", param=param,
                           kind="permission_error")
        try:
            if storage.default_storage().size(url) > limits.max_image_bytes:
                raise ApiError(413, f"image over {limits.max_image_bytes} bytes", param=param)
            data = storage.read_bytes(url)
        except FileNotFoundError:
            raise ApiError(404, f"{url} does not exist", param=param) from None
        name = url
    elif dicomweb.is_dicomweb(url):
        data, name = _fetch_instance(url, param, config), url + ".dcm"
    elif url.startswith(("http://", "https://")):
        if not config.allow_http_images:
            raise ApiError(400, "http(s) image URLs are disabled on this server; send a data: URL", param=param)
        data = _fetch(url, param, config.limits.max_image_bytes)
        name = url
    else:
        raise ApiError(400, "image_url must be a data: URL, an s3:// URI or a DICOMweb instance "
                            "(dicomweb://HOST:PORT/ROOT/studies/S/series/S/instances/I)", param=param)
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"image over {limits.max_image_bytes} bytes", param=param)
    try:
        return load_image(data, name, ImageOptions(max_pixels=limits.max_pixels))
    except ImageDecodeError as e:
        raise ApiError(400, f"{param}: {e.reason}", param=param) from None


def _fetch_instance(url: str, param: str, config: ServeConfig) -> bytes:
    """A DICOMweb instance (WADO-RS) on an allowed server. What the PACS refuses medray (its
    credentials) is the server's fault, said as a 502; an instance it does not have, a 404."""
    try:
        dicomweb.check_allowed(url, config.allowed_dicomweb_servers)
        dicomweb.parse_instance_uri(url)
    except storage.AccessDenied as e:
        raise ApiError(403, f"{param}: {e}", param=param, kind="permission_error") from None
    except ValueError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None
    try:
        return dicomweb.fetch_instance(url, timeout_s=IMAGE_FETCH_S)
    except dicomweb.DicomwebError as e:
        if "(HTTP 404)" in str(e):
            raise ApiError(404, f"{param}: {e}", param=param) from None
        raise ApiError(502, f"{param}: {e}", kind="server_error") from None
    except storage.AccessDenied as e:  # the PACS refused this server's credentials
        raise ApiError(502, f"{param}: {e}", kind="server_error") from None


def _fetch(url: str, param: str, limit: int) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=IMAGE_FETCH_S, follow_redirects=False) as r:
            if r.status_code != 200:
                raise ApiError(400, f"fetching the image gave HTTP {r.status_code}", param=param)
            data = b""
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > limit:
                    raise ApiError(413, f"image over {limit} bytes", param=param)
            return data
    except httpx.HTTPError as e:
        raise ApiError(400, f"could not fetch the image: {type(e).__name__}", param=param) from None
