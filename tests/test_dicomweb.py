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


def instance(modality: str, study: str, series: str, number: int, corrupt: bool = False) -> bytes:
    """A small single-frame instance of a synthetic study, written with pydicom alone."""
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
    pixels = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * (number + 1)) % 4096
    ds.PixelData = pixels.tobytes()[: 100 if corrupt else None]  # corrupt: far fewer bytes than 32x32
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    server = local_pacs.start(tmp_path_factory.mktemp("orthanc"))
    try:
        studies = {"ct-a": generate_uid(), "ct-b": generate_uid(), "cr": generate_uid()}
        stored = {"CT": set(), "CR": set()}
        for name, modality, n in (("ct-a", "CT", 3), ("ct-b", "CT", 4), ("cr", "CR", 2)):
            series = generate_uid()
            for i in range(n):
                data = instance(modality, studies[name], series, i, corrupt=(name == "ct-b" and i == 3))
                server.store(data)
                stored[modality].add(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).SOPInstanceUID)
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
    assert all(i.frames == 1 for i in found)
    one_study = dicomweb.parse(f"{server.root}?StudyInstanceUID={studies['ct-a']}")
    assert {i.study_uid for i in dicomweb.search_instances(one_study, 0, 100)} == {studies["ct-a"]}
    assert len(dicomweb.search_instances(one_study, 0, 100)) == 3
    assert dicomweb.search_instances(dicomweb.parse(server.root + "?Modality=MR"), 0, 10) == []


def test_an_instance_is_fetched_whole_and_reads_back(pacs, login):
    server, stored, _ = pacs
    service = dicomweb.parse(server.root + "?Modality=CR")
    for found in dicomweb.search_instances(service, 0, 10):
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicomweb.fetch_instance(found.uri(service))))
        assert ds.SOPInstanceUID == found.sop_uid and ds.StudyInstanceUID == found.study_uid
        assert ds.pixel_array.shape == (32, 32)


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
    reports = dicomweb.parse(server.root + "?Modality=SR")
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
    again = run_inference(cfg, progress=False)
    assert (again.rows, again.skipped) == (0, len(stored["CT"]))
    assert len(read_shards(cfg.output)) == len(stored["CT"])
    # A rerun of the whole output (a crash before its shards were written) stores the same SRs:
    # the PACS still holds one per instance.
    import shutil

    shutil.rmtree(cfg.output)
    run_inference(cfg, progress=False)
    assert len(dicomweb.search_instances(reports, 0, 100)) == len(rows) - 1


def test_reports_go_to_a_folder_too_and_a_missing_source_fails_its_row_alone(pacs, login, tmp_path):
    from medray.infer.reports import write_reports

    server, _, _ = pacs
    service = dicomweb.parse(server.root + "?Modality=CR")
    rows = [{"id": f.sop_uid, "image": f.uri(service), "question": "Describe it.", "answer": "A chest.", "error": ""}
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


def test_a_chat_request_names_a_pacs_instance(ray_cluster, pacs):
    """Serve: the openai client sends a DICOMweb instance URL as its image; the ingress fetches
    it (WADO-RS, on an allowed server) and the model answers; an instance on another server
    is a 403 naming it, one the PACS lacks a 404, and the PACS's credentials appear nowhere."""
    import openai
    from ray import serve

    from medray.serve import build_app
    from medray.storage.local_s3 import free_port

    import ray
    from ray.serve.context import _get_global_client

    server, _, _ = pacs
    key = "sk-pacs-test"
    # Serve is left as this test found it: a Serve started here stops at its end, so a later
    # module's own serve.start gets the HTTP port it asks for.
    started_here = _get_global_client(raise_if_no_controller_running=False) is None
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})

    port = ray.get(_get_global_client()._controller.get_http_config.remote()).port
    args = {"models": [{"name": "llava", "uri": "tiny://llava-mistral", "cpus_per_replica": 0.25}],
            "api_keys": [key], "allowed_dicomweb_servers": [server.root]}
    serve.run(build_app(args), name="pacs", route_prefix="/pacs")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/pacs/v1", api_key=key, max_retries=0)
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
