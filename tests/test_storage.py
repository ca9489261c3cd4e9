"""Storage against a real S3 HTTP endpoint (moto's server on loopback) and local files."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from medray import storage
from medray.storage import AccessDenied, Storage, StorageConfig, sync_prefix


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_list_exists(where, bucket, tmp_path):
    root = bucket + "/data" if where == "s3" else str(tmp_path / "data")
    storage.write_text(storage.join(root, "a.txt"), "alpha")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "sub", "c.json"), "{}")

    assert storage.read_text(storage.join(root, "a.txt")) == "alpha"
    assert storage.read_bytes(storage.join(root, "sub", "b.bin")) == b"\x00\x01"
    assert storage.exists(storage.join(root, "a.txt"))
    assert not storage.exists(storage.join(root, "missing.txt"))
    names = [f.uri.rsplit("/", 1)[1] for f in storage.list_files(root)]
    assert names == ["a.txt", "b.bin", "c.json"]
    assert [f.uri.rsplit("/", 1)[1] for f in storage.list_files(root, include="sub/*", exclude="*.json")] == ["b.bin"]
    assert [f.uri.rsplit("/", 1)[1] for f in storage.list_files(root, recursive=False)] == ["a.txt"]
    assert storage.list_files(storage.join(root, "not-yet")) == []  # callers need no existence check
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing.txt"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_listing_page_starts_after_a_uri_and_stops_at_its_limit(where, bucket, tmp_path):
    root = bucket + "/paged" if where == "s3" else str(tmp_path / "paged")
    for name in ("a.json", "b.cancel", "c.json", "d.json", "e.json"):
        storage.write_text(storage.join(root, name), "{}")

    def names(**kwargs):
        return [f.uri.rsplit("/", 1)[1] for f in storage.list_files(root, include="*.json", **kwargs)]

    assert names(limit=2) == ["a.json", "c.json"]  # the filter applies before the limit
    assert names(start_after=storage.join(root, "a.json"), limit=2) == ["c.json", "d.json"]
    assert names(start_after=storage.join(root, "b.zzz")) == ["c.json", "d.json", "e.json"]  # any URI, not a file
    assert names(start_after=storage.join(root, "e.json")) == []
    assert names(limit=0) == []


def test_a_listing_page_of_a_large_prefix_costs_one_request(bucket):
    """S3 returns at most 1,000 keys per list request: a page of five from a prefix of 1,100
    objects must not walk the whole prefix."""
    st = storage.default_storage()
    loc = storage.parse_s3(f"{bucket}/many")
    for i in range(1100):
        st.client.put_object(Bucket=loc.bucket, Key=f"{loc.key}/obj-{i:05d}", Body=b"x")
    calls = []

    def count(params, **kwargs):  # botocore's own event hook: the requests still go out
        calls.append(params)

    st.client.meta.events.register("before-call.s3.ListObjectsV2", count)
    try:
        page = st.list_files(f"{bucket}/many", start_after=f"{bucket}/many/obj-00997", limit=5)
        assert [f.uri.rsplit("/", 1)[1] for f in page] == [f"obj-{i:05d}" for i in range(998, 1003)]
        assert len(calls) == 1, calls
        calls.clear()
        assert len(st.list_files(f"{bucket}/many")) == 1100  # without a limit: every page
        assert len(calls) == 2
    finally:
        st.client.meta.events.unregister("before-call.s3.ListObjectsV2", count)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_atomic_writer_leaves_nothing_on_failure(where, bucket, tmp_path):
    uri = f"{bucket}/out/shard-0.parquet" if where == "s3" else str(tmp_path / "out" / "shard-0.parquet")
    with pytest.raises(RuntimeError, match="worker died"):
        with storage.atomic_writer(uri) as f:
            f.write(b"half a shard")
            raise RuntimeError("worker died")
    assert not storage.exists(uri)
    if where == "local":
        assert list((tmp_path / "out").iterdir()) == []  # no stray temp file either
    with storage.atomic_writer(uri) as f:
        f.write(b"whole shard")
    assert storage.read_bytes(uri) == b"whole shard"


def test_allowed_prefixes_are_enforced_on_path_boundaries(bucket):
    storage.write_text(f"{bucket}/allowed/x.txt", "ok")
    storage.write_text(f"{bucket}/allowed-not/y.txt", "secret")
    st = Storage(StorageConfig(
        endpoint_url=storage.default_storage().config.endpoint_url,
        allowed_prefixes=(f"{bucket}/allowed",)))
    assert st.read_text(f"{bucket}/allowed/x.txt") == "ok"
    with pytest.raises(AccessDenied, match="outside the allowed"):
        st.read_text(f"{bucket}/allowed-not/y.txt")
    with pytest.raises(AccessDenied):
        st.write_text(f"{bucket}/elsewhere.txt", "no")
    with pytest.raises(AccessDenied):
        st.list_files(f"{bucket}")
    assert not storage.exists(f"{bucket}/elsewhere.txt")
    with pytest.raises(ValueError, match="s3://"):
        StorageConfig(allowed_prefixes=("/local/path",))


def test_allowed_prefixes_from_env(bucket, monkeypatch):
    monkeypatch.setenv("MEDRAY_S3_ALLOWED_PREFIXES", f"{bucket}/a, {bucket}/b")
    storage.write_text(f"{bucket}/b/ok.txt", "fine")
    with pytest.raises(AccessDenied):
        storage.write_text(f"{bucket}/c/no.txt", "no")


def test_sync_prefix_fetches_only_changed_objects(bucket, tmp_path):
    prefix = f"{bucket}/model"
    storage.write_text(f"{prefix}/config.json", '{"a": 1}')
    storage.write_bytes(f"{prefix}/weights/part-1.bin", b"x" * 1000)
    dest = tmp_path / "mirror"

    first = sync_prefix(prefix, dest)
    assert sorted(first.downloaded) == ["config.json", "weights/part-1.bin"]
    assert (dest / "weights" / "part-1.bin").read_bytes() == b"x" * 1000

    again = sync_prefix(prefix, dest)
    assert again.downloaded == () and again.removed == ()

    storage.write_text(f"{prefix}/config.json", '{"a": 2}')  # new ETag
    storage.default_storage().delete(f"{prefix}/weights/part-1.bin")
    third = sync_prefix(prefix, dest)
    assert third.downloaded == ("config.json",)
    assert third.removed == ("weights/part-1.bin",)
    assert (dest / "config.json").read_text() == '{"a": 2}'
    assert not (dest / "weights" / "part-1.bin").exists()


def test_sync_prefix_of_nothing_is_an_error(bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing under"):
        sync_prefix(f"{bucket}/absent", tmp_path / "m")


class _FlakyProxy:
    """An HTTP proxy in front of the S3 endpoint that answers 503 to the first N requests."""

    def __init__(self, upstream: str, failures: int):
        self.upstream = urlparse(upstream)
        self.failures = failures
        self.seen = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen += 1
                if proxy.seen <= proxy.failures:
                    msg = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_transient_failures_are_retried(bucket, s3_server):
    storage.write_text(f"{bucket}/r.txt", "survives")
    proxy = _FlakyProxy(s3_server.endpoint_url, failures=2)
    try:
        st = Storage(StorageConfig(endpoint_url=proxy.url, max_attempts=4))
        assert st.read_text(f"{bucket}/r.txt") == "survives"
        assert proxy.seen == 3
        proxy.seen, proxy.failures = 0, 10
        once = Storage(StorageConfig(endpoint_url=proxy.url, max_attempts=2))
        with pytest.raises(storage.StorageError, match=f"{bucket}/r.txt"):
            once.read_text(f"{bucket}/r.txt")
        assert proxy.seen == 2
    finally:
        proxy.close()


def test_pyarrow_filesystem_reaches_the_same_endpoint(bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.default_storage().filesystem_for(f"{bucket}/tables/t.parquet")
    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=fs)
    assert storage.exists(f"{bucket}/tables/t.parquet")
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2, 3]


def test_mirror_refuses_keys_that_escape_it(bucket, tmp_path):
    storage.default_storage().client.put_object(Bucket=bucket[len("s3://"):], Key="m/../../evil.txt", Body=b"x")
    with pytest.raises(storage.StorageError, match="escapes"):
        sync_prefix(f"{bucket}/m", tmp_path / "mirror" / "m")
    assert not (tmp_path / "evil.txt").exists()


def test_upload_of_a_mirror_skips_its_bookkeeping(bucket, tmp_path):
    storage.write_text(f"{bucket}/src/config.json", "{}")
    mirror = sync_prefix(f"{bucket}/src", tmp_path / "mirror").path
    assert (mirror / ".medray-etags.json").exists()
    written = storage.upload_dir(mirror, f"{bucket}/copy")
    assert written == [f"{bucket}/copy/config.json"]


def test_missing_credentials_name_the_uri_and_the_remedy(bucket, monkeypatch, tmp_path):
    """A process without S3 credentials (a cluster node started without them) fails with an
    error that names the URI and where credentials come from, not botocore's bare
    NoCredentialsError; and the settings a driver passes to its workers hold no secret."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = Storage()
    for call in (lambda: store.read_bytes(f"{bucket}/runs/x.json"), lambda: store.exists(f"{bucket}/runs/x.json"),
                 lambda: store.list_files(f"{bucket}/runs/")):
        with pytest.raises(storage.NoCredentials, match=rf"no S3 credentials for {bucket}/runs/.*cluster/README.md"):
            call()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-to-be-forwarded")
    monkeypatch.setenv("MEDRAY_API_KEYS", "sk-secret")
    forwarded = storage.forwardable_env()
    assert forwarded["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1")
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MEDRAY_API_KEYS"} & set(forwarded)
