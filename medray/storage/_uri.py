"""URI parsing shared by the storage backends: `s3://bucket/key` or a local path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"


def parse_s3(uri: str) -> S3Location:
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return S3Location(bucket, key)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI, with '/' for S3."""
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out = f"{out}/{str(p).strip('/')}"
        return out
    return str(Path(base, *parts))


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return Path(os.path.expanduser(uri))
