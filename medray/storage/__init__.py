"""Local paths and s3:// URIs behind one small API.

    >>> from medray import storage
    >>> storage.write_text("s3://bucket/runs/a/notes.txt", "hello")   # doctest: +SKIP
    >>> storage.read_text("s3://bucket/runs/a/notes.txt")              # doctest: +SKIP
    'hello'

Module-level functions use a default `Storage` configured from the environment
(AWS_ENDPOINT_URL, AWS_* credentials, MEDRAY_S3_ALLOWED_PREFIXES). Build a `Storage`
yourself to use other settings. Nothing here knows about models or Ray.

Owns: local and S3 paths behind one API. Must not import anything else from medray.
"""

from __future__ import annotations

from ._cache import SyncResult, cache_root, sync_prefix
from ._ranges import KeyRange
from ._store import (AccessDenied, FileInfo, NoCredentials, Storage, StorageConfig, StorageError, default_storage,
                     forwardable_env, within)
from ._uri import S3Location, is_s3, join, local_path, parse_s3

__all__ = [
    "AccessDenied", "FileInfo", "NoCredentials", "S3Location", "forwardable_env", "Storage", "StorageConfig", "StorageError",
    "SyncResult", "cache_root", "default_storage", "is_s3", "join", "local_path", "parse_s3",
    "read_bytes", "read_text", "write_bytes", "write_text", "list_files", "exists",
    "atomic_writer", "upload_dir", "sync_prefix", "within", "delete", "KeyRange", "split_prefix", "list_range",
]

def read_bytes(uri: str) -> bytes:
    return default_storage().read_bytes(uri)


def read_text(uri: str) -> str:
    return default_storage().read_text(uri)


def write_bytes(uri: str, data: bytes) -> None:
    default_storage().write_bytes(uri, data)


def write_text(uri: str, text: str) -> None:
    default_storage().write_text(uri, text)


def list_files(prefix: str, **kwargs) -> list[FileInfo]:
    return default_storage().list_files(prefix, **kwargs)


def exists(uri: str) -> bool:
    return default_storage().exists(uri)


def atomic_writer(uri: str, mode: str = "wb"):
    return default_storage().atomic_writer(uri, mode)


def upload_dir(path, uri: str) -> list[str]:
    return default_storage().upload_dir(path, uri)


def delete(uri: str) -> None:
    default_storage().delete(uri)


def split_prefix(prefix: str, max_ranges: int) -> list[KeyRange]:
    """Contiguous key ranges covering everything under `prefix`, for tasks to list in parallel
    (a bounded number of requests, whatever the prefix holds; see _ranges)."""
    from ._ranges import split_prefix as split

    return split(default_storage(), prefix, max_ranges)


def list_range(rng: KeyRange, **kwargs):
    """The files of one key range, a page (a list of FileInfo) at a time."""
    from ._ranges import list_range as pages

    return pages(default_storage(), rng, **kwargs)
