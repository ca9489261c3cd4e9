"""A PACS on loopback, for the tests and the benches: Debian's Orthanc with its DICOMweb
plugin (`make test` installs both, as it installs chromium), started on free loopback ports
with HTTP basic auth and an empty storage directory, as local_s3 runs moto's server for S3.
DICOM files go in through Orthanc's own REST API (POST /instances), not through medray's
DICOMweb code, which the tests then read them back with."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from .local_s3 import free_port

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def available() -> bool:
    return shutil.which("Orthanc") is not None and PLUGIN.exists()


@dataclass
class Orthanc:
    port: int
    user: str
    password: str
    process: subprocess.Popen

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def root(self) -> str:
        """Its DICOMweb service root as medray names it."""
        return f"dicomweb://127.0.0.1:{self.port}/dicom-web"

    def store(self, data: bytes) -> dict:
        r = requests.post(f"{self.http}/instances", data=data, auth=(self.user, self.password), timeout=30)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(directory: Path, user: str = "medray", password: str = "pacs-secret-7") -> Orthanc:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {"Name": "medray-test", "StorageDirectory": str(directory / "db"), "IndexDirectory": str(directory / "db"),
              "HttpPort": port, "DicomPort": free_port(), "DicomServerEnabled": False,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {user: password},
              "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (directory / "config.json").write_text(json.dumps(config))
    log = (directory / "orthanc.log").open("w")
    process = subprocess.Popen(["Orthanc", str(directory / "config.json")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/system", auth=(user, password), timeout=2).status_code == 200:
                return Orthanc(port, user, password, process)
        except requests.RequestException:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"Orthanc did not start; its log: {directory / 'orthanc.log'}")
