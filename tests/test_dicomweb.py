"""DICOMweb against a real PACS (medray.storage.local_pacs): QIDO-RS searches page through exactly the
matching instances, WADO-RS fetches each one's file, credentials come from the environment
and never show in a message, and only allowed servers are reached. The DICOM files are made
here with pydicom (and pydicom's own samples), stored through Orthanc's REST API."""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medray.storage import AccessDenied
from medray.storage import dicomweb

from medray.storage import local_pacs

pytestmark = pytest.mark.skipif(not local_pacs.available() and os.environ.get("MEDRAY_CI") != "1",
                                reason="Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")


def instance(modality: str, study: str, series: str, number: int, corrupt: bool = False, frames: int = 1) -> bytes:
    """A small instance of a synthetic study (frame f's pixels: (i * (number + 1) + f) % 4096),
    written with pydicom alone."""
    from io import BytesIO

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.StudyDate = "P-" + study[-4:], "Test^Patient", "20240315"
    ds.Modality, ds.InstanceNumber = modality, number
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.stack([(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * (number + 1) + f * 1000) % 4096
                       for f in range(frames)])
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()[: 100 if corrupt else None]  # corrupt: far fewer bytes than 32x32
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    server = local_pacs.start(tmp_path_factory.mktemp("orthanc"))
    try:
        studies = {"ct-a": generate_uid(), "ct-b": generate_uid(), "cr": generate_uid(), "mr": generate_uid()}
        stored = {"CT": set(), "CR": set(), "MR": set(), "multi-frame": set()}
        # ct-a's last instance has 3 frames; ct-b's last is corrupt; the MR study is the
        # long one a run is killed in.
        for name, modality, n in (("ct-a", "CT", 4), ("ct-b", "CT", 4), ("cr", "CR", 2), ("mr", "MR", 32)):
            series = generate_uid()
            for i in range(n):
                frames = 3 if name == "ct-a" and i == n - 1 else 1
                data = instance(modality, studies[name], series, i, corrupt=(name == "ct-b" and i == 3), frames=frames)
                server.store(data)
                uid = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).SOPInstanceUID
                stored[modality].add(uid)
                if frames > 1:
                    stored["multi-frame"].add(uid)
        sample = pydicom.data.get_testdata_file("CT_small.dcm")
        server.store(open(sample, "rb").read())
        stored["CT"].add(pydicom.dcmread(sample).SOPInstanceUID)
        yield server, stored, studies
    finally:
        server.stop()


@pytest.fixture
def login(pacs, monkeypatch):
    server = pacs[0]
    monkeypatch.setenv(dicomweb.USER_ENV, server.user)
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, server.password)
    monkeypatch.delenv(dicomweb.TOKEN_ENV, raising=False)


def test_a_search_pages_through_exactly_the_matching_instances(pacs, login):
    server, stored, studies = pacs
    service = dicomweb.parse(server.root + "?Modality=CT")
    found, offset = [], 0
    while True:  # pages of 3: every CT instance once, no CR one
        page = dicomweb.search_instances(service, offset, 3)
        found += page
        offset += 3
        if len(page) < 3:
            break
    assert sorted(i.sop_uid for i in found) == sorted(stored["CT"])
    assert {i.sop_uid for i in found if i.frames == 3} == stored["multi-frame"]
    assert all(i.frames == 1 for i in found if i.sop_uid not in stored["multi-frame"])
    one_study = dicomweb.parse(f"{server.root}?StudyInstanceUID={studies['ct-a']}")
    assert {i.study_uid for i in dicomweb.search_instances(one_study, 0, 100)} == {studies["ct-a"]}
    assert len(dicomweb.search_instances(one_study, 0, 100)) == 4
    # Two studies at once (UID list matching), the query's other keys still applied.
    two = dicomweb.parse(f"{server.root}?Modality=CT&StudyInstanceUID={studies['ct-a']},{studies['cr']}")
    assert {i.study_uid for i in dicomweb.search_instances(two, 0, 100)} == {studies["ct-a"]}
    assert dicomweb.search_instances(dicomweb.parse(server.root + "?Modality=MG"), 0, 10) == []


def test_a_study_search_lists_the_studies_of_an_instance_query(pacs, login):
    """What the web page lists: the studies holding the query's instances, an instance-level
    Modality asked as the study's ModalitiesInStudy (Orthanc answers a study search by Modality
    with nothing)."""
    server, stored, studies = pacs
    found = {s.uid: s for s in dicomweb.search_studies(dicomweb.parse(server.root + "?Modality=CT"), 0, 50)}
    sample = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    assert set(found) == {studies["ct-a"], studies["ct-b"], sample.StudyInstanceUID}
    assert found[studies["ct-a"]].instances == 4 and found[studies["ct-a"]].modalities == ("CT",)
    assert found[studies["ct-a"]].date == "20240315"
    # A page of one. (Orthanc 1.10 counts offset before it matches ModalitiesInStudy, so pages
    # after the first are the server's to get right: the web page asks for one page.)
    page = dicomweb.search_studies(dicomweb.parse(server.root + "?Modality=CT"), 0, 1)
    assert len(page) == 1 and page[0].uid in found


def test_an_instance_is_fetched_whole_and_reads_back(pacs, login):
    from medray.data import ImageOptions, load_image

    server, stored, studies = pacs
    service = dicomweb.parse(server.root + "?Modality=CR")
    for found in dicomweb.search_instances(service, 0, 10):
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicomweb.fetch_instance(found.uri(service))))
        assert ds.SOPInstanceUID == found.sop_uid and ds.StudyInstanceUID == found.study_uid
        assert ds.pixel_array.shape == (32, 32)
    # A multi-frame instance comes whole; the model sees its middle frame (the frame rule).
    service = dicomweb.parse(f"{server.root}?StudyInstanceUID={studies['ct-a']}")
    multi = next(i for i in dicomweb.search_instances(service, 0, 10) if i.sop_uid in stored["multi-frame"])
    data = dicomweb.fetch_instance(multi.uri(service))
    assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).pixel_array.shape == (3, 32, 32)
    seen, frame = (np.asarray(load_image(data, options=ImageOptions(dicom_frame=f))) for f in (None, 1))
    assert np.array_equal(seen, frame)
    assert not np.array_equal(seen, np.asarray(load_image(data, options=ImageOptions(dicom_frame=0))))


def test_wrong_credentials_fail_naming_the_server_and_no_secret(pacs, monkeypatch):
    server = pacs[0]
    for user, password in (("medray", "wrong-password-9"), (None, None)):
        if user:
            monkeypatch.setenv(dicomweb.USER_ENV, user)
            monkeypatch.setenv(dicomweb.PASSWORD_ENV, password)
        else:
            monkeypatch.delenv(dicomweb.USER_ENV, raising=False)
            monkeypatch.delenv(dicomweb.PASSWORD_ENV, raising=False)
        with pytest.raises(AccessDenied) as refused:
            dicomweb.check_access(server.root + "?Modality=CT")
        message = str(refused.value)
        assert f"127.0.0.1:{server.port}/dicom-web" in message and "401" in message, message
        assert server.password not in message and "wrong-password-9" not in message


def _self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, self-signed (cryptography): their PEM paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))
    return str(directory / "cert.pem"), str(directory / "key.pem")


def _tls_front(port: int, cert: str, key: str):
    """HTTPS on a free loopback port in front of http://127.0.0.1:`port`, as a hospital's
    TLS-terminating proxy stands before its PACS (Debian's Orthanc 1.10 crashes serving HTTPS
    itself: a civetweb segfault on the first TLS connection). Returns (its port, a stop)."""
    import socket
    import ssl
    import threading

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle(raw):
        try:
            conn = context.wrap_socket(raw, server_side=True)
        except OSError:  # a client that does not trust the certificate ends the handshake
            raw.close()
            return
        upstream = socket.create_connection(("127.0.0.1", port))
        threading.Thread(target=pump, args=(conn, upstream), daemon=True).start()
        pump(upstream, conn)

    def accept():
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(raw,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1], listener.close


def test_tls_trusts_the_ca_bundle_given_and_a_token_is_named_not_shown(pacs, tmp_path, monkeypatch):
    """dicomwebs:// to the PACS behind HTTPS with a self-signed certificate: untrusted without
    MEDRAY_DICOMWEB_CA_BUNDLE (a clear error naming the server), searched and fetched with it;
    a bearer token the PACS refuses is named by its variable, never shown."""
    server, stored, _ = pacs
    cert, key = _self_signed(tmp_path)
    port, stop = _tls_front(server.port, cert, key)
    root = f"dicomwebs://127.0.0.1:{port}/dicom-web"
    try:
        monkeypatch.setenv(dicomweb.USER_ENV, server.user)
        monkeypatch.setenv(dicomweb.PASSWORD_ENV, server.password)
        monkeypatch.delenv(dicomweb.TOKEN_ENV, raising=False)
        monkeypatch.delenv(dicomweb.CA_BUNDLE_ENV, raising=False)
        with pytest.raises(dicomweb.DicomwebError, match=f"{root} cannot be reached: SSLError"):
            dicomweb.check_access(root + "?Modality=CR")
        monkeypatch.setenv(dicomweb.CA_BUNDLE_ENV, cert)
        service = dicomweb.check_access(root + "?Modality=CR")
        found = dicomweb.search_instances(service, 0, 10)
        assert {f.sop_uid for f in found} == stored["CR"]
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicomweb.fetch_instance(found[0].uri(service))))
        assert ds.SOPInstanceUID == found[0].sop_uid
        monkeypatch.setenv(dicomweb.TOKEN_ENV, "tok-secret-123")
        with pytest.raises(AccessDenied) as refused:
            dicomweb.check_access(root + "?Modality=CR")
        assert "the token in MEDRAY_DICOMWEB_TOKEN" in str(refused.value) and "tok-secret-123" not in str(refused.value)
    finally:
        stop()


def test_the_read_tasks_share_a_search_page_by_page(pacs, login, monkeypatch):
    """The pipeline's parts of a search (infer.sources): part i reads every n-th page from page
    i, and stops at a short page; together they hold every match once, whatever the count."""
    from medray.infer import InferConfig
    from medray.infer import sources

    server, stored, _ = pacs
    monkeypatch.setattr(sources, "DICOMWEB_PAGE", 2)
    for parts in (1, 3, 8):
        monkeypatch.setattr(sources, "DICOMWEB_PARTS", parts)
        cfg = InferConfig(model="m", task="caption", input=server.root + "?Modality=CT", output="o")
        ids = [r["id"] for part in sources.plan_parts(cfg) for page in sources.RowMaker(cfg).pages(part) for r in page]
        assert sorted(ids) == sorted(stored["CT"]), parts


def test_a_pacs_query_is_answered_row_by_row_exactly_once(ray_cluster, pacs, tmp_path):
    """`medray infer --input dicomweb://...?Modality=CT --sr-output dicomweb://...` on the
    session's Ray: every CT instance once, by its SOP Instance UID, with its study and series;
    no CR instance; the corrupt one failed in its own row; an SR per answer stored back; a
    rerun finds all done and writes nothing, and answering again stores no second SR."""
    from medray.data.shards import read_shards
    from medray.infer import InferConfig, run_inference

    server, stored, studies = pacs
    cfg = InferConfig(model="tiny://llava-mistral", task="vqa", question="Is there an opacity?", max_new_tokens=3,
                      batch_size=4, rows_per_shard=4, input=server.root + "?Modality=CT", output=str(tmp_path / "out"),
                      sr_output=server.root)
    summary = run_inference(cfg, progress=False)
    rows = {r["id"]: r for r in read_shards(cfg.output)}
    assert len(read_shards(cfg.output)) == len(rows) == len(stored["CT"]) == summary.rows
    assert set(rows) == stored["CT"]
    failed = [r for r in rows.values() if r["error"]]
    assert summary.errors == 1 and len(failed) == 1 and "DICOM" in failed[0]["error"], failed
    assert failed[0]["study_uid"] == studies["ct-b"]
    assert all(r["answer"] and r["completion_tokens"] > 0 for r in rows.values() if not r["error"])
    for r in rows.values():  # the row names its instance: study, series, and the WADO-RS URI
        assert r["image"] == f"{server.root}/studies/{r['study_uid']}/series/{r['series_uid']}/instances/{r['id']}"
    assert {rows[i]["study_uid"] for i in rows} >= {studies["ct-a"], studies["ct-b"]}
    # Each answered instance has one SR in the PACS, read back with QIDO/WADO and pydicom: in
    # the source's study, referencing it, naming the model, holding the question and answer.
    sample = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm")).StudyInstanceUID
    reports = dicomweb.parse(f"{server.root}?Modality=SR&StudyInstanceUID={studies['ct-a']},{studies['ct-b']},{sample}")
    found = dicomweb.search_instances(reports, 0, 100)
    assert len(found) == len(rows) - 1
    for f in found:
        sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicomweb.fetch_instance(f.uri(reports))))
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
        source = rows[items["Source image"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        assert sr.StudyInstanceUID == source["study_uid"] and not source["error"]
        assert items["Finding"].TextValue == source["answer"] and items["Request"].TextValue == "Is there an opacity?"
        assert items["Device Observer Model Name"].TextValue == "tiny://llava-mistral"
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert {rows[i]["error"] == "" for i in stored["multi-frame"]} == {True}  # one row, answered
    again = run_inference(cfg, progress=False)
    assert (again.rows, again.skipped) == (0, len(stored["CT"]))
    assert len(read_shards(cfg.output)) == len(stored["CT"])
    assert len(dicomweb.search_instances(reports, 0, 100)) == len(rows) - 1


def test_a_run_killed_mid_query_resumes_and_stores_nothing_twice(ray_cluster, pacs, tmp_path):
    """`medray infer` over a PACS query, as a user runs it: wrong credentials end it at start
    (the server named, the secret nowhere); a run whose driver is killed mid-query resumes with
    only the missing instances, and the PACS holds one SR per instance (the resumed run stores
    the killed one's SRs again under the same UIDs)."""
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    from _kill import kill_once_shards_land

    from medray.data.shards import read_shards
    from medray.infer import InferConfig, run_inference

    server, stored, studies = pacs
    query, output = server.root + "?Modality=MR", tmp_path / "out"
    exe = str(Path(sys.executable).with_name("medray"))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    flags = ["--model", "tiny://llava-mistral", "--task", "caption", "--max-new-tokens", "3", "--batch-size", "4",
             "--rows-per-shard", "4", "--input", query, "--sr-output", server.root]
    refused = subprocess.run([exe, "infer", *flags, "--output", str(tmp_path / "never")], capture_output=True,
                             text=True, timeout=180, env={**env, dicomweb.PASSWORD_ENV: "wrong-password-9"})
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2 and f"127.0.0.1:{server.port}/dicom-web refused" in said and "401" in said, said
    assert "wrong-password-9" not in said and server.password not in said
    assert not (tmp_path / "never").exists()

    proc = subprocess.Popen([exe, "infer", *flags, "--output", str(output)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    kill_once_shards_land(proc, output)  # the driver dies mid-query
    done_before = len(read_shards(str(output)))
    assert 0 < done_before < len(stored["MR"])

    cfg = InferConfig(model="tiny://llava-mistral", task="caption", max_new_tokens=3, batch_size=4, rows_per_shard=4,
                      input=query, output=str(output), sr_output=server.root)
    summary = run_inference(cfg, progress=False)
    assert (summary.skipped, summary.rows) == (done_before, len(stored["MR"]) - done_before)
    counts = Counter(r["id"] for r in read_shards(str(output)))
    assert set(counts) == stored["MR"] and max(counts.values()) == 1
    reports = dicomweb.parse(f"{server.root}?Modality=SR&StudyInstanceUID={studies['mr']}")
    found = dicomweb.search_instances(reports, 0, 100)
    assert len(found) == len(stored["MR"]) == len({f.sop_uid for f in found})


def test_reports_go_to_a_folder_too_and_a_missing_source_fails_its_row_alone(pacs, login, tmp_path):
    from medray.infer.reports import write_reports

    server, _, _ = pacs
    service = dicomweb.parse(server.root + "?Modality=CR")
    answer = "Léger épanchement, 肺 \ufffd"  # any text a model writes: stored as UTF-8, not Latin-1's '?'
    rows = [{"id": f.sop_uid, "image": f.uri(service), "question": "Describe it.", "answer": answer, "error": ""}
            for f in dicomweb.search_instances(service, 0, 10)]
    gone = {**rows[0], "id": "1.2.3", "image": rows[0]["image"].rsplit("/", 1)[0] + "/1.2.3"}
    failed = write_reports([*rows, gone, {**rows[0], "id": "x", "error": "earlier"}], sr_output=str(tmp_path / "sr"),
                           model="m", model_digest="sha256:0", run="r")
    assert list(failed) == ["1.2.3"] and "/instances/1.2.3/metadata (HTTP 404)" in failed["1.2.3"]
    written = sorted(tmp_path.glob("sr/*/*.dcm"))
    assert [p.stem for p in written] == sorted(r["id"] for r in rows)
    for path in written:
        sr = pydicom.dcmread(path)
        assert sr.Modality == "SR" and sr.StudyInstanceUID == path.parent.name
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
        assert items["Finding"].TextValue == answer


def test_the_service_answers_from_a_pacs_and_runs_a_job_over_picked_studies(ray_cluster, pacs, tmp_path,
                                                                             browser_page):
    """Serve: the openai client sends a DICOMweb instance URL as its image; the ingress fetches
    it (WADO-RS, on an allowed server) and the model answers; an instance on another server
    is a 403 naming it, one the PACS lacks a 404, and the PACS's credentials appear nowhere.
    The web page, in Chromium, lists a query's studies; a person picks two of three and
    submits a job over them, which answers exactly their instances and files an SR for each."""
    import httpx
    import openai
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from medray.data.shards import read_shards
    from medray.serve import build_app
    from medray.storage.local_s3 import free_port

    server, stored, studies = pacs
    key = "sk-pacs-test"
    # Serve is left as this test found it: a Serve started here stops at its end, so a later
    # module's own serve.start gets the HTTP port it asks for.
    started_here = _get_global_client(raise_if_no_controller_running=False) is None
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})

    port = ray.get(_get_global_client()._controller.get_http_config.remote()).port
    results = tmp_path / "results"
    args = {"models": [{"name": "llava", "uri": "tiny://llava-mistral", "cpus_per_replica": 0.25}],
            "api_keys": [key], "allowed_dicomweb_servers": [server.root],
            "jobs": {"store": str(tmp_path / "jobs"), "allowed_output_prefixes": [str(results)],
                     "allowed_dicomweb_servers": [server.root], "rows_per_shard": 4, "batch_size": 4,
                     "cpus_per_actor": 0.25, "cpus_per_task": 0.25}}
    serve.run(build_app(args), name="pacs", route_prefix="/pacs")
    base = f"http://127.0.0.1:{port}/pacs"
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        service = dicomweb.parse(server.root + "?Modality=CR")
        url = dicomweb.search_instances(service, 0, 1)[0].uri(service)

        def ask(image_url: str):
            return client.chat.completions.create(model="llava", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What is shown?"}]}])

        answer = ask(url)
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
        with pytest.raises(openai.PermissionDeniedError, match="127.0.0.1:1/dicom-web/studies/.* is not on an allowed DICOMweb server"):
            ask(url.replace(f":{server.port}/", ":1/"))
        with pytest.raises(openai.NotFoundError, match="HTTP 404") as missing:
            ask(url.rsplit("/", 1)[0] + "/1.2.3")
        assert server.password not in str(missing.value)

        # The studies route, as the page calls it: another server is a 403 that names it; a URI
        # that is no DICOMweb one a 400; a job naming another server, or SRs to one, a 403.
        auth = {"Authorization": f"Bearer {key}"}
        other = httpx.get(f"{base}/v1/dicomweb/studies", params={"url": "dicomweb://10.0.0.9:8042/dicom-web"},
                          headers=auth, timeout=30)
        assert other.status_code == 403 and "10.0.0.9:8042/dicom-web is not on an allowed" in other.text
        assert httpx.get(f"{base}/v1/dicomweb/studies", params={"url": "s3://b/x"}, headers=auth,
                         timeout=30).status_code == 400
        for field, value in (("input", "dicomweb://10.0.0.9:8042/dicom-web?Modality=CT"),
                             ("sr_output", "dicomweb://10.0.0.9:8042/dicom-web")):
            job = {"model": "llava", "input": server.root + "?Modality=CT", "output": str(results / "x"),
                   field: value}
            refused = httpx.post(f"{base}/v1/jobs", json=job, headers=auth, timeout=30)
            assert refused.status_code == 403 and "10.0.0.9" in refused.text, refused.text

        page, errors = browser_page, []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        page.fill("#key", key)
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length >= 1")
        page.fill("#pacs-query", server.root + "?Modality=CT")
        page.click("#pacs-search")
        page.wait_for_function("document.querySelectorAll('.pacs-pick').length === 3")
        assert "3 studies match" in page.inner_text("#pacs-status")
        assert "20240315" in page.inner_text("#pacs-studies")
        page.uncheck(f".pacs-pick[value='{studies['ct-b']}']")  # the study with the corrupt instance
        page.click("#pacs-use")
        picked = page.input_value("#job-input")
        sample = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        narrowed = dicomweb.parse(picked)
        assert narrowed.server == server.root and dict(narrowed.query)["Modality"] == "CT"
        assert sorted(dict(narrowed.query)["StudyInstanceUID"].split(",")) == sorted(
            [studies["ct-a"], sample.StudyInstanceUID])
        page.fill("#job-output", str(results / "page"))
        page.fill("#job-sr-output", str(results / "sr"))
        page.select_option("#job-task", "caption")
        page.click("#job-submit")
        page.wait_for_function("/succeeded|failed|cancelled/.test(document.getElementById('job-status').textContent)",
                               timeout=180_000)
        status = page.inner_text("#job-status")
        assert "succeeded" in status and "5 / 5 rows" in status, status
        rows = read_shards(str(results / "page"))
        in_a = {i.sop_uid for i in dicomweb.search_instances(
            dicomweb.parse(f"{server.root}?Modality=CT&StudyInstanceUID={studies['ct-a']}"), 0, 100)}
        assert sorted(r["id"] for r in rows) == sorted(in_a | {sample.SOPInstanceUID})  # each once, no ct-b
        assert all(r["answer"] and not r["error"] for r in rows)
        written = sorted(p.stem for p in (results / "sr").glob("*/*.dcm"))
        assert written == sorted(r["id"] for r in rows)
        # Its report shows each instance, fetched from the PACS and windowed as the model saw it.
        with page.context.expect_page() as opened:
            page.click("#job-status a.report")
        report = opened.value
        report.wait_for_load_state("load")
        assert "5 rows, 0 errors" in report.inner_text("body")
        assert report.evaluate("document.querySelectorAll('img.thumb').length") == 5
        assert report.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert not errors, errors
    finally:
        serve.delete("pacs")
        if started_here:
            serve.shutdown()


def test_only_allowed_servers_and_no_credentials_in_uris():
    allowed = ["dicomweb://pacs.hospital.org:8042/dicom-web"]
    service = dicomweb.check_allowed("dicomweb://PACS.hospital.org:8042/dicom-web/?Modality=CT", allowed)
    assert service.url == "http://pacs.hospital.org:8042/dicom-web" and service.query == (("Modality", "CT"),)
    with pytest.raises(AccessDenied, match="other.org:8042/dicom-web is not on an allowed"):
        dicomweb.check_allowed("dicomweb://other.org:8042/dicom-web?Modality=CT", allowed)
    dicomweb.check_allowed("dicomweb://pacs.hospital.org:8042/dicom-web/studies/1/series/2/instances/3", allowed)
    with pytest.raises(AccessDenied, match="is not on an allowed"):  # a root that merely starts the same
        dicomweb.check_allowed("dicomweb://pacs.hospital.org:8042/dicom-web2/studies/1/series/2/instances/3", allowed)
    with pytest.raises(AccessDenied, match="allowed: none"):
        dicomweb.check_allowed("dicomweb://pacs.hospital.org:8042/dicom-web", [])
    with pytest.raises(ValueError, match="carries no credentials.*MEDRAY_DICOMWEB_USER"):
        dicomweb.parse("dicomweb://u:secret@pacs:8042/dicom-web")
    assert dicomweb.parse("dicomwebs://pacs/dicom-web").url == "https://pacs:443/dicom-web"
    uri = "dicomweb://pacs:8042/dicom-web/studies/1.2/series/3.4/instances/5.6"
    service, study, series, sop = dicomweb.parse_instance_uri(uri)
    assert (service.server, study, series, sop) == ("dicomweb://pacs:8042/dicom-web", "1.2", "3.4", "5.6")
