"""A real PACS for the tests: Orthanc (Debian `orthanc`) with its DICOMweb plugin (`orthanc-dicomweb`),
started on a free loopback port with a generated configuration and storage folder, filled through its
REST API, stopped at the end. Its verbose log names every HTTP request, so a test can count WADO-RS
retrievals."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (Debian package orthanc; .ci/run installs it)"
    if not PLUGIN.exists():
        return "Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return None


needs_orthanc = pytest.mark.skipif(orthanc_missing() is not None, reason=str(orthanc_missing()))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    """`with Orthanc(folder) as pacs:` a running server; `pacs.dicomweb` is the source to ingest."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None, port: int | None = None):
        self.folder, self.users = folder, users
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"dicomweb+{self.url}/dicom-web"

    def start(self) -> "Orthanc":
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {"Name": "embedstore-tests", "HttpPort": self.port, "DicomServerEnabled": False,
                  "StorageDirectory": str(storage), "IndexDirectory": str(storage), "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": self.users is not None, "RegisteredUsers": self.users or {},
                  "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                  "HttpThreadsCount": 8, "MaximumStorageCacheSize": 0}
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        with self.log.open("a") as log:
            self.process = subprocess.Popen(["Orthanc", "--verbose", str(self.folder / "orthanc.json")],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                requests.get(f"{self.url}/system", timeout=1, auth=self._auth())
                return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise AssertionError(f"Orthanc did not start in {START_TIMEOUT_S} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _auth(self):
        return next(iter(self.users.items())) if self.users else None

    def upload(self, paths: list[Path]) -> None:
        for path in paths:
            answer = requests.post(f"{self.url}/instances", data=path.read_bytes(), auth=self._auth(), timeout=30)
            answer.raise_for_status()
            assert answer.json()["Status"] in ("Success", "AlreadyStored"), answer.json()

    def retrievals(self) -> int:
        """WADO-RS instance retrievals so far (metadata requests not counted)."""
        pattern = re.compile(r"GET /dicom-web/studies/[^/ ]+/series/[^/ ]+/instances/[^/ ]+\s*$", re.M)
        return len(pattern.findall(self.log.read_text(errors="replace")))

    def find_instance(self, sop_uid: str) -> str:
        """Orthanc's id of the instance with this SOPInstanceUID."""
        answer = requests.post(f"{self.url}/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}},
                               auth=self._auth(), timeout=30)
        answer.raise_for_status()
        (found,) = answer.json()
        return found



class RefusingProxy:
    """`with RefusingProxy(pacs, sop_uid) as proxy:` a loopback proxy to `pacs` that answers 404 to
    the retrieval of one instance and passes everything else on: a PACS that lists an instance it
    cannot give. `proxy.dicomweb` is the source to ingest."""

    def __init__(self, pacs: Orthanc, refused_sop_uid: str):
        upstream, refused = pacs.url, f"/instances/{refused_sop_uid}"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path.split("?")[0].endswith(refused):
                    self.send_error(404, "instance not found")
                    return
                answer = requests.get(upstream + self.path, headers={"Accept": self.headers.get("Accept", "*/*")},
                                      timeout=30)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args):
                """Quiet: http.server would log every request on stderr."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def dicomweb(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def __enter__(self) -> "RefusingProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
