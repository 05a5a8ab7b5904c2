"""An S3-protocol server for the tests: moto's server mode (PyPI `moto[s3]` with flask) on a free loopback
port, started and stopped by the tests; the code under test talks to it with its real clients, told
where through the standard AWS environment variables."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.orthanc import free_port

START_TIMEOUT_S = 30


def s3_server_missing() -> str | None:
    """Why moto's server cannot run here, or None."""
    missing = [name for name in ("moto", "flask", "flask_cors") if importlib.util.find_spec(name) is None]
    return f"{', '.join(missing)} not installed" if missing else None


needs_s3_server = pytest.mark.skipif(s3_server_missing() is not None, reason="moto's S3 server is not installed "
                                     "(pip install 'moto[s3]' flask flask-cors, part of the dev extra)")


class S3Server:
    """`with S3Server(log_folder) as s3:` a running server; `s3.environment` are the variables a client
    needs (fake credentials: moto accepts any), `s3.make_bucket(name)` and `s3.put(bucket, key, bytes)`."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def environment(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "embedstore-test",
                "AWS_SECRET_ACCESS_KEY": "embedstore-test-secret", "AWS_REGION": "us-east-1"}

    def __enter__(self) -> "S3Server":
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "moto.log").open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "moto.log").read_text()[-2000:]
            try:
                requests.get(self.url, timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise AssertionError(f"moto did not start in {START_TIMEOUT_S} s")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def make_bucket(self, name: str) -> None:
        requests.put(f"{self.url}/{name}", timeout=10).raise_for_status()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        requests.put(f"{self.url}/{bucket}/{key}", data=data, timeout=30).raise_for_status()

    def requests(self) -> int:
        """Every request served so far (listings, HEADs and writes too), from the server's log."""
        return len(re.findall(r'"(?:GET|HEAD|PUT|POST|DELETE) /\S* HTTP', self._log()))

    def gets(self) -> int:
        """Object GET requests served so far (listings not counted), from the server's log."""
        return len(re.findall(r'"GET /[^/?\s]+/[^?\s]+ HTTP', self._log()))

    def _log(self) -> str:
        """The server's log, its colour codes taken out."""
        return re.sub(r"\x1b\[[0-9;]*m", "", (self.folder / "moto.log").read_text(errors="replace"))
