"""One API over local paths and s3:// URIs.

boto3 moves objects; pyarrow's S3FileSystem (built from the same settings) is what Ray
Data wants. Endpoint and credentials come from the standard AWS environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) unless given explicitly, so MinIO, Ceph or a
loopback moto server work exactly like AWS.

Why one file of this size: one class behind local and S3 paths (retries, atomic writes,
prefix rules), whose methods share those rules.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from ._uri import S3Location, is_s3, local_path, parse_s3

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A read, write or listing failed for a reason the caller should see (names the URI)."""


class AccessDenied(StorageError):
    """The URI lies outside the prefixes this process is allowed to touch."""


# Settings a driver may hand to the Ray workers it starts (runtime_env env_vars): where the
# store is and how to find credentials, never the credentials themselves. Secrets reach a
# cluster's processes through the nodes' own environment (set where `ray start` runs, or a
# Kubernetes Secret), an instance role, or a credentials file on the nodes; a runtime_env is
# shown by the dashboard and the state API.
_FORWARDABLE = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE", "AWS_EC2_METADATA_DISABLED",
                "MEDRAY_S3_ALLOWED_PREFIXES", "MEDRAY_CACHE_DIR")


def forwardable_env() -> dict[str, str]:
    """The storage settings of this process that are safe to pass to Ray workers: no secrets."""
    return {k: os.environ[k] for k in _FORWARDABLE if k in os.environ}


class NoCredentials(StorageError):
    """No S3 credentials in this process; the message names the URI and where they come from."""


@dataclass(frozen=True)
class StorageConfig:
    """How to reach S3. Every field defaults to what the AWS environment says."""

    endpoint_url: str | None = None
    """S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO; None means AWS_ENDPOINT_URL or AWS."""
    region: str | None = None
    """Region; None means AWS_REGION / AWS_DEFAULT_REGION, else us-east-1."""
    allowed_prefixes: tuple[str, ...] | None = None
    """s3:// prefixes this process may read or write; None allows any (the caller's own
    credentials bound it), an empty tuple allows none."""
    max_attempts: int = 5
    """Attempts per S3 call, retrying throttling, 5xx and connection errors (botocore 'standard')."""
    connect_timeout_s: float = 10.0
    """Seconds to wait for a TCP connection to the endpoint."""
    read_timeout_s: float = 60.0
    """Seconds to wait for a response."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.allowed_prefixes is not None:
            for p in self.allowed_prefixes:
                if not is_s3(p):
                    raise ValueError(f"allowed prefix must be an s3:// URI, got {p!r}")

    @classmethod
    def from_env(cls) -> "StorageConfig":
        """Settings from the environment; MEDRAY_S3_ALLOWED_PREFIXES is comma-separated."""
        raw = os.environ.get("MEDRAY_S3_ALLOWED_PREFIXES")
        prefixes = None if raw is None else tuple(p.strip() for p in raw.split(",") if p.strip())
        return cls(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            allowed_prefixes=prefixes,
        )


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int
    etag: str | None = None


def _prefix_allows(prefix: str, uri: str) -> bool:
    # A prefix "s3://b/data" must not admit "s3://b/data-secret": match on path boundaries.
    prefix = prefix.rstrip("/")
    return uri == prefix or uri.startswith(prefix + "/")


def within(uri: str, prefixes) -> bool:
    """Whether `uri` lies inside one of `prefixes`, matched on path boundaries."""
    if "/../" in uri + "/" or "/./" in uri + "/":
        return False  # never let a relative segment climb out of a prefix
    return any(_prefix_allows(p, uri) for p in prefixes)


@dataclass
class Storage:
    """Read, list and write local paths and s3:// URIs with one set of calls."""

    config: StorageConfig = field(default_factory=StorageConfig.from_env)
    _client: object | None = field(default=None, init=False, repr=False)
    _credentials_checked: bool = field(default=False, init=False, repr=False)

    # ----------------------------------------------------------------- S3 plumbing
    def check_allowed(self, uri: str) -> None:
        if not is_s3(uri) or self.config.allowed_prefixes is None:
            return
        if not any(_prefix_allows(p, uri) for p in self.config.allowed_prefixes):
            raise AccessDenied(f"{uri} is outside the allowed S3 prefixes")

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                retries={"total_max_attempts": self.config.max_attempts, "mode": "standard"},
                connect_timeout=self.config.connect_timeout_s,
                read_timeout=self.config.read_timeout_s,
            )
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.config.endpoint_url,
                region_name=self.config.region or "us-east-1",
                config=cfg,
            )
        return self._client

    def _s3(self, uri: str) -> S3Location:
        self.check_allowed(uri)
        self._check_credentials(uri)
        return parse_s3(uri)

    def _check_credentials(self, uri: str) -> None:
        # Once per Storage: without credentials botocore fails deep inside a call with an error
        # that names no URI and no remedy (seen as a raw NoCredentialsError ending a Ray job).
        if self._credentials_checked:
            return
        import boto3

        if boto3.session.Session().get_credentials() is None:
            import socket

            raise NoCredentials(
                f"no S3 credentials for {uri} in this process (host {socket.gethostname()}). boto3 looks in the "
                "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), AWS_SHARED_CREDENTIALS_FILE or ~/.aws, "
                "and the instance role. On a Ray cluster every node needs them: start the nodes with them in "
                "the environment, give the nodes a role (IRSA on Kubernetes), or put a credentials file on "
                "the nodes; see cluster/README.md")
        self._credentials_checked = True

    def pyarrow_filesystem(self):
        """A pyarrow S3FileSystem with this storage's endpoint and credentials (for Ray Data)."""
        import boto3
        from pyarrow import fs as pafs

        creds = boto3.session.Session().get_credentials()
        kwargs: dict = {"region": self.config.region or "us-east-1"}
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key,
                          session_token=frozen.token)
        if self.config.endpoint_url:
            url = urlparse(self.config.endpoint_url)
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme or "https")
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=self.config.max_attempts)
        return pafs.S3FileSystem(**kwargs)

    def filesystem_for(self, uri: str):
        """(pyarrow filesystem, path) for a URI, the form Ray Data's readers and writers take."""
        if is_s3(uri):
            loc = self._s3(uri)
            return self.pyarrow_filesystem(), f"{loc.bucket}/{loc.key}".rstrip("/")
        from pyarrow import fs as pafs

        return pafs.LocalFileSystem(), str(local_path(uri).resolve())

    # ---------------------------------------------------------------- reads
    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            loc = self._s3(uri)
            try:
                return self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
            except self.client.exceptions.NoSuchKey as e:
                raise FileNotFoundError(uri) from e
            except Exception as e:  # botocore errors carry no URI; add it
                raise StorageError(f"reading {uri}: {e}") from e
        return local_path(uri).read_bytes()

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            loc = self._s3(uri)
            from botocore.exceptions import ClientError

            try:
                self.client.head_object(Bucket=loc.bucket, Key=loc.key)
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise StorageError(f"checking {uri}: {e}") from e
        return local_path(uri).exists()

    def size(self, uri: str) -> int:
        """Size in bytes of one object or file (FileNotFoundError if absent)."""
        if is_s3(uri):
            loc = self._s3(uri)
            from botocore.exceptions import ClientError

            try:
                return int(self.client.head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"])
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise FileNotFoundError(uri) from e
                raise StorageError(f"checking {uri}: {e}") from e
        return local_path(uri).stat().st_size

    def list_files(self, prefix: str, *, recursive: bool = True, include: str | None = None,
                   exclude: str | None = None, start_after: str | None = None,
                   limit: int | None = None) -> list[FileInfo]:
        """Files under a directory or s3:// prefix, sorted by URI; none for a prefix that does
        not exist (yet), local or S3 alike.

        `include` / `exclude` are globs matched against the path relative to `prefix`.
        `start_after` (a URI) and `limit` give one page: the first `limit` files whose URI sorts
        after `start_after`. On S3 the listing starts there (StartAfter) and stops once the page
        is full, so a page costs a request or two however many objects the prefix holds.
        """
        if is_s3(prefix):
            base = prefix.rstrip("/") + "/"
            found = self._list_s3(prefix, recursive, start_after)  # already in key order
        else:
            root = local_path(prefix)
            if root.is_file():
                return [FileInfo(str(root), root.stat().st_size)]
            it = root.rglob("*") if recursive else root.glob("*")
            base = str(root).rstrip("/") + "/"
            found = sorted((FileInfo(str(p), p.stat().st_size) for p in it if p.is_file()), key=lambda i: i.uri)
            if start_after is not None:
                found = [i for i in found if i.uri > str(local_path(start_after))]

        def keep(info: FileInfo) -> bool:
            rel = info.uri[len(base):] if info.uri.startswith(base) else info.uri
            if include and not fnmatch.fnmatch(rel, include):
                return False
            return not (exclude and fnmatch.fnmatch(rel, exclude))

        return list(itertools.islice((i for i in found if keep(i)), limit))

    def _list_s3(self, prefix: str, recursive: bool, start_after: str | None = None) -> Iterator[FileInfo]:
        """Lazily, page by page: a caller that stops early sends no further list requests."""
        loc = self._s3(prefix)
        key_prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        kwargs = {"Bucket": loc.bucket, "Prefix": key_prefix}
        if not recursive:
            kwargs["Delimiter"] = "/"
        if start_after is not None:
            kwargs["StartAfter"] = self._s3(start_after).key
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # console-made "folder" markers
                    yield FileInfo(f"s3://{loc.bucket}/{obj['Key']}", obj["Size"], obj.get("ETag", "").strip('"') or None)
        except Exception as e:
            raise StorageError(f"listing {prefix}: {e}") from e

    # ---------------------------------------------------------------- writes
    @contextlib.contextmanager
    def atomic_writer(self, uri: str, mode: str = "wb") -> Iterator:
        """Yield a file to write; it appears under `uri` only if the block finishes.

        Local files are renamed into place (rename is atomic on POSIX). S3 objects are
        uploaded after the block: a PUT or a completed multipart upload is all-or-nothing,
        so readers never see half an object.
        """
        if is_s3(uri):
            self._s3(uri)  # fail on a denied prefix before any work is done
            fd, tmp = tempfile.mkstemp(prefix=".medray-upload-")
        else:
            dest = local_path(uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        try:
            with os.fdopen(fd, mode) as f:
                yield f
            if is_s3(uri):
                self.upload_file(tmp, uri)
            else:
                os.replace(tmp, dest)
                tmp = None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def write_bytes(self, uri: str, data: bytes) -> None:
        if is_s3(uri):
            loc = self._s3(uri)
            try:
                self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
            except Exception as e:
                raise StorageError(f"writing {uri}: {e}") from e
            return
        with self.atomic_writer(uri) as f:
            f.write(data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def upload_file(self, path: str | Path, uri: str) -> None:
        if not is_s3(uri):
            dest = local_path(uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self.atomic_writer(uri) as f, open(path, "rb") as src:
                shutil.copyfileobj(src, f)
            return
        loc = self._s3(uri)
        try:
            # upload_file switches to multipart for large files; either way the object
            # becomes visible only once complete.
            self.client.upload_file(str(path), loc.bucket, loc.key)
        except Exception as e:
            raise StorageError(f"uploading {path} to {uri}: {e}") from e

    def upload_dir(self, path: str | Path, uri: str) -> list[str]:
        """Copy every file under a local directory to a prefix; returns the written URIs."""
        root = Path(path)
        written = []
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.startswith(".medray-"):  # skip mirror bookkeeping
                dest = f"{uri.rstrip('/')}/{p.relative_to(root).as_posix()}" if is_s3(uri) \
                    else str(local_path(uri) / p.relative_to(root))
                self.upload_file(p, dest)
                written.append(dest)
        return written

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            loc = self._s3(uri)
            self.client.delete_object(Bucket=loc.bucket, Key=loc.key)
        else:
            local_path(uri).unlink(missing_ok=True)

    def download_file(self, uri: str, path: str | Path) -> None:
        """Fetch one object to a local path, atomically (temp file, then rename)."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.close(fd)
        try:
            if is_s3(uri):
                loc = self._s3(uri)
                try:
                    self.client.download_file(loc.bucket, loc.key, tmp)
                except Exception as e:
                    raise StorageError(f"downloading {uri}: {e}") from e
            else:
                shutil.copyfile(local_path(uri), tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


_default: tuple[tuple, Storage] | None = None


def default_storage() -> Storage:
    """The process-wide Storage, rebuilt if the relevant environment changed."""
    global _default
    key = tuple(os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID", "MEDRAY_S3_ALLOWED_PREFIXES"))
    if _default is None or _default[0] != key:
        _default = (key, Storage(StorageConfig.from_env()))
    return _default[1]
