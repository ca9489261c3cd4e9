"""DICOMweb services (a PACS: Orthanc, dcm4chee, Google Cloud Healthcare, AWS HealthImaging)
named by URI, as S3 prefixes are:

    dicomweb://HOST:PORT/ROOT?QUERY     (dicomwebs:// for HTTPS)

ROOT is the service root (Orthanc's is /dicom-web); QUERY holds QIDO-RS matching keys for a
search of instances (`Modality=CT`, `StudyDate=20240101-20241231`, `StudyInstanceUID=...`).
Here: parsing those URIs, the servers a process may reach (MEDRAY_DICOMWEB_ALLOWED, as
MEDRAY_S3_ALLOWED_PREFIXES), credentials from the environment, a page of a QIDO-RS search,
and an instance fetched with WADO-RS. Nothing here knows about models or Ray.

Credentials never travel in a URI, a config or a runtime_env: HTTP basic from
MEDRAY_DICOMWEB_USER and MEDRAY_DICOMWEB_PASSWORD, or a bearer token from
MEDRAY_DICOMWEB_TOKEN, read by each process that calls the server; MEDRAY_DICOMWEB_CA_BUNDLE
names a CA bundle for dicomwebs://.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

from ._store import AccessDenied, StorageError

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
USER_ENV, PASSWORD_ENV, TOKEN_ENV = "MEDRAY_DICOMWEB_USER", "MEDRAY_DICOMWEB_PASSWORD", "MEDRAY_DICOMWEB_TOKEN"
CA_BUNDLE_ENV = "MEDRAY_DICOMWEB_CA_BUNDLE"
ALLOWED_ENV = "MEDRAY_DICOMWEB_ALLOWED"
TIMEOUT_S = 60

# The DICOM tags a search returns for each instance, by keyword; asked for with includefield
# where a server does not return them by default.
STUDY_UID, SERIES_UID, SOP_UID, FRAMES = "0020000D", "0020000E", "00080018", "00280008"


def is_dicomweb(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in SCHEMES if "://" in uri else False


@dataclass(frozen=True)
class Service:
    """A DICOMweb service root and, for a search, its QIDO-RS matching keys."""

    scheme: str
    host: str
    port: int
    root: str
    query: tuple[tuple[str, str], ...] = field(default=())

    @property
    def server(self) -> str:
        """How the server is named in messages and in the allowed list: the URI without the query."""
        return f"{self.scheme}://{self.host}:{self.port}{self.root}"

    @property
    def url(self) -> str:
        """The service root over HTTP(S)."""
        return f"{SCHEMES[self.scheme]}://{self.host}:{self.port}{self.root}"


def parse(uri: str) -> Service:
    """A `dicomweb(s)://HOST:PORT/ROOT?QUERY` URI; ValueError saying what is wrong."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{uri!r} is not a DICOMweb URI: write dicomweb://HOST:PORT/ROOT?QUERY (dicomwebs:// "
                         "for HTTPS)")
    if parts.username or parts.password:
        raise ValueError(f"a DICOMweb URI carries no credentials ({parts.hostname}): set {USER_ENV} and "
                         f"{PASSWORD_ENV}, or {TOKEN_ENV}, where medray runs")
    if not parts.hostname:
        raise ValueError(f"{uri!r} names no host: write dicomweb://HOST:PORT/ROOT?QUERY")
    port = parts.port or (443 if scheme == "dicomwebs" else 80)
    root = "/" + parts.path.strip("/") if parts.path.strip("/") else ""
    return Service(scheme, parts.hostname.lower(), port, root, tuple(parse_qsl(parts.query, keep_blank_values=True)))


def allowed_servers() -> list[str] | None:
    """MEDRAY_DICOMWEB_ALLOWED: comma-separated service roots (`dicomweb://pacs:8042/dicom-web`);
    None where it is not set (any server), as MEDRAY_S3_ALLOWED_PREFIXES for S3."""
    raw = os.environ.get(ALLOWED_ENV)
    return None if raw is None else [s.strip() for s in raw.split(",") if s.strip()]


def check_allowed(uri: str, allowed: list[str] | None = None) -> Service:
    """The service of `uri` (a search, or an instance below a service root), if it is on one of
    the `allowed` service roots (by default allowed_servers(), where None allows any);
    AccessDenied naming the server otherwise. [] allows none."""
    service = parse(uri)
    allowed = allowed if allowed is not None else allowed_servers()
    if allowed is None:
        return service
    servers = {parse(a).server for a in allowed}
    # A search names the service root; an instance, a path below it.
    if not any(service.server == root or service.server.startswith(root + "/") for root in servers):
        raise AccessDenied(f"{service.server} is not on an allowed DICOMweb server; allowed: "
                           f"{sorted(servers) or 'none'} ({ALLOWED_ENV}, or the config's allowed_dicomweb_servers)")
    return service


_sessions = threading.local()


def _session():
    """This thread's HTTP session for the credentials the environment holds now: kept, so its
    connections are (a new connection per instance cost more than the instance's transfer)."""
    import requests
    from urllib3.util.retry import Retry

    key = tuple(os.environ.get(k) for k in (TOKEN_ENV, USER_ENV, PASSWORD_ENV, CA_BUNDLE_ENV))
    kept = getattr(_sessions, "kept", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    session = requests.Session()
    # A kept connection that the server closed meanwhile (Orthanc closes idle ones after 1 s)
    # fails the next request sent on it, and its row with it: such a request is sent once
    # more, on a new connection. Both methods are safe to repeat here: GETs, and STOW-RS of
    # the same SOP Instance UIDs (stored once). One retry of a read: a timeout waits twice.
    retry = Retry(total=2, connect=2, read=1, status=0, other=0, backoff_factor=0.1, raise_on_status=False,
                  allowed_methods=frozenset({"GET", "POST"}))
    session.mount("http://", requests.adapters.HTTPAdapter(max_retries=retry))
    session.mount("https://", requests.adapters.HTTPAdapter(max_retries=retry))
    token, user, password, ca_bundle = key
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    session.verify = ca_bundle or True  # passed with each request too (_send): see there
    _sessions.kept = (key, session)
    return session


def _send(method: str, url: str, **kwargs):
    session = _session()
    # The session's CA bundle given per request: requests lets REQUESTS_CA_BUNDLE (set on many
    # machines, to the system's bundle) override a session's own `verify`, and then
    # MEDRAY_DICOMWEB_CA_BUNDLE went unused.
    return session.request(method, url, verify=session.verify, **kwargs)


class DicomwebError(StorageError):
    """A DICOMweb server refused or failed a request; says which server, never a credential."""


def _get(service: Service, path: str, params: dict | None = None, accept: str = "application/dicom+json",
         timeout_s: float = TIMEOUT_S, compressed: bool = True):
    import requests

    url = service.url + path + ("?" + urlencode(params, doseq=True) if params else "")
    headers = {"Accept": accept} if compressed else {"Accept": accept, "Accept-Encoding": "identity"}
    try:
        response = _send("GET", url, headers=headers, timeout=timeout_s)
    except requests.RequestException as e:
        raise DicomwebError(f"DICOMweb server {service.server} cannot be reached: {type(e).__name__}") from None
    if response.status_code in (401, 403):
        how = (f"the token in {TOKEN_ENV}" if os.environ.get(TOKEN_ENV) else
               f"the user in {USER_ENV}" if os.environ.get(USER_ENV) else f"no credentials ({USER_ENV} and "
               f"{PASSWORD_ENV}, or {TOKEN_ENV}, are not set)")
        raise AccessDenied(f"DICOMweb server {service.server} refused {how}: HTTP {response.status_code}")
    if response.status_code == 204:
        return None
    if response.status_code == 404:
        raise DicomwebError(f"DICOMweb server {service.server} has nothing at {path} (HTTP 404)")
    if response.status_code >= 400:
        raise DicomwebError(f"DICOMweb server {service.server} answered HTTP {response.status_code} to {path}")
    return response


@dataclass(frozen=True)
class Instance:
    """One instance a search found: its UIDs and its number of frames (1 unless multi-frame)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    frames: int = 1

    def uri(self, service: Service) -> str:
        """Its WADO-RS URI, as medray's rows carry it."""
        return f"{service.server}/studies/{self.study_uid}/series/{self.series_uid}/instances/{self.sop_uid}"


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def search_instances(service: Service, offset: int = 0, limit: int = 100) -> list[Instance]:
    """One page of the QIDO-RS search of instances the URI's query names (`limit` at `offset`)."""
    params = dict(service.query)
    params.update(offset=str(offset), limit=str(limit), includefield=FRAMES)
    response = _get(service, "/instances", params)
    found = [] if response is None else response.json()
    return [Instance(_value(i, STUDY_UID), _value(i, SERIES_UID), _value(i, SOP_UID), int(_value(i, FRAMES) or 1))
            for i in found]


# The keys of an instance search that a study search takes too, and Modality, which it asks as
# ModalitiesInStudy (Orthanc answers a study search by Modality with nothing, silently).
STUDY_KEYS = {"StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientID", "PatientName",
              "StudyDescription", "StudyID", "ReferringPhysicianName", "ModalitiesInStudy", "fuzzymatching"}
STUDY_FIELDS = {"date": "00080020", "description": "00081030", "modalities": "00080061",
                "instances": "00201208", "accession": "00080050"}


@dataclass(frozen=True)
class Study:
    """One study a search found, as a person picks it: its UID, date, description, modalities
    and number of instances (all of the study's, whatever the query's instance keys)."""

    uid: str
    date: str = ""
    description: str = ""
    modalities: tuple[str, ...] = ()
    instances: int = 0
    accession: str = ""


def search_studies(service: Service, offset: int = 0, limit: int = 50) -> list[Study]:
    """One page of the studies that hold the instances the URI's query names (QIDO-RS
    `ROOT/studies`, with the query's study-level keys: STUDY_KEYS). Orthanc 1.10 applies
    `offset` before it matches ModalitiesInStudy: there, pages after the first may miss studies
    (the web page asks for one page of 200)."""
    params: dict[str, str | list[str]] = {}
    for key, value in service.query:
        key = "ModalitiesInStudy" if key == "Modality" else key
        if key in STUDY_KEYS:
            params[key] = value
    params.update(offset=str(offset), limit=str(limit), includefield=list(STUDY_FIELDS.values()))
    response = _get(service, "/studies", params)
    found = [] if response is None else response.json()
    return [Study(_value(s, STUDY_UID), str(_value(s, STUDY_FIELDS["date"]) or ""),
                  str(_value(s, STUDY_FIELDS["description"]) or ""),
                  tuple((s.get(STUDY_FIELDS["modalities"]) or {}).get("Value") or ()),
                  int(_value(s, STUDY_FIELDS["instances"]) or 0), str(_value(s, STUDY_FIELDS["accession"]) or ""))
            for s in found]


def check_access(uri: str) -> Service:
    """Ask the server once (a search of one instance), so that a wrong credential fails a run
    at its start, naming the server; returns the service."""
    service = parse(uri)
    search_instances(service, 0, 1)
    return service


def parse_instance_uri(uri: str) -> tuple[Service, str, str, str]:
    """(service, study, series, SOP instance UID) of an instance's WADO-RS URI (Instance.uri)."""
    service = parse(uri)
    parts = service.root.strip("/").split("/")
    if len(parts) < 6 or parts[-6::2] != ["studies", "series", "instances"]:
        raise ValueError(f"{uri!r} names no instance: .../studies/S/series/S/instances/I")
    root = "/" + "/".join(parts[:-6]) if parts[:-6] else ""
    return Service(service.scheme, service.host, service.port, root), parts[-5], parts[-3], parts[-1]


def uids_of(uri: str) -> tuple[str, str]:
    """(study UID, series UID) of an instance's WADO-RS URI; ("", "") for any other URI."""
    if not is_dicomweb(uri):
        return "", ""
    try:
        _, study, series, _ = parse_instance_uri(uri)
    except ValueError:
        return "", ""
    return study, series


def fetch_instance(uri: str, timeout_s: float = TIMEOUT_S) -> bytes:
    """An instance's DICOM file (WADO-RS, the first part of its multipart/related answer)."""
    service, study, series, sop = parse_instance_uri(uri)
    # Uncompressed over HTTP: pixels gain little from gzip, and the PACS pays for it. Orthanc
    # spent 21 ms of CPU per 512x512 CT slice gzipping it, 1.4 ms sending it plain
    # (bench/dicomweb.py); a hospital's PACS serves its radiologists from the same CPUs.
    response = _get(service, f"/studies/{study}/series/{series}/instances/{sop}",
                    accept='multipart/related; type="application/dicom"', timeout_s=timeout_s, compressed=False)
    if response is None:
        raise DicomwebError(f"DICOMweb server {service.server} has no instance {sop}")
    return _first_part(response.headers.get("Content-Type", ""), response.content, service)


def instance_metadata(uri: str) -> dict:
    """An instance's attributes without its pixels (WADO-RS metadata), as DICOM JSON."""
    service, study, series, sop = parse_instance_uri(uri)
    response = _get(service, f"/studies/{study}/series/{series}/instances/{sop}/metadata")
    if response is None or not response.json():
        raise DicomwebError(f"DICOMweb server {service.server} has no instance {sop}")
    return response.json()[0]


def store_instances(root: str, files: list[bytes]) -> None:
    """Store DICOM files with STOW-RS (`POST ROOT/studies`, one multipart/related request).
    An instance the server holds already (the same SOP Instance UID) is not stored twice."""
    import uuid

    import requests

    service = parse(root)
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
                    for f in files) + b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    try:
        response = _send("POST", service.url + "/studies", data=body, headers=headers, timeout=TIMEOUT_S)
    except requests.RequestException as e:
        raise DicomwebError(f"DICOMweb server {service.server} cannot be reached: {type(e).__name__}") from None
    if response.status_code in (401, 403):
        raise AccessDenied(f"DICOMweb server {service.server} refused to store: HTTP {response.status_code}")
    if response.status_code >= 300:
        raise DicomwebError(f"DICOMweb server {service.server} did not store {len(files)} instance(s): HTTP "
                            f"{response.status_code}")


def _first_part(content_type: str, body: bytes, service: Service) -> bytes:
    """The body of the first part of a multipart/related answer (RFC 2046)."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"')
    if not content_type.lower().startswith("multipart/") or not boundary:
        raise DicomwebError(f"DICOMweb server {service.server} answered {content_type or 'no Content-Type'}, "
                            "not multipart/related")
    delimiter = b"--" + boundary.encode()
    start = body.find(delimiter)
    head_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delimiter, head_end)
    if start < 0 or head_end < 0 or end < 0:
        raise DicomwebError(f"DICOMweb server {service.server} sent a multipart answer without a whole part")
    return body[head_end + 4:end]
