"""A real test PACS: Orthanc with its DICOMweb plugin, started on 127.0.0.1 with free ports.

:class:`Orthanc` writes a temporary configuration (storage and index in a temporary folder,
remote access off, HTTP authentication on with one test user, ctfm's own storage SCP registered
as a modality for C-MOVE/C-GET), starts the server, waits until it answers, and stops it at the
end. ``upload`` sends files with dcmtk's ``storescu`` (C-STORE). Tests that need one skip with the
reason where Orthanc, its plugin or dcmtk is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
USER, PASSWORD = "ctfm-test", "pw-Zq8v3kT1-secret"
AET = "ORTHANC"
CTFM_AET = "CTFM"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None
    )


def dicomweb_plugin() -> str | None:
    return next(
        (str(Path(d) / "libOrthancDicomWeb.so") for d in PLUGIN_DIRS if (Path(d) / "libOrthancDicomWeb.so").is_file()),
        None,
    )


def require_pacs_tools() -> tuple[str, str]:
    """Orthanc's binary and DICOMweb plugin, or skip with what to install."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk's storescu is not installed (apt-get install dcmtk)")
    return binary, plugin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process; ``dicomweb`` and ``dimse`` are its ctfm addresses."""

    def __init__(self, folder: Path, ctfm_port: int | None = None, check_called_aet: bool = True, tls: bool = False):
        self.binary, plugin = require_pacs_tools()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.ctfm_port = ctfm_port or free_port()
        self.config = {
            "Name": "ctfm-test",
            "DicomAet": AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "Plugins": [plugin],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomCheckCalledAet": check_called_aet,
            "DicomModalities": {
                CTFM_AET: {
                    "AET": CTFM_AET,
                    "Host": "127.0.0.1",
                    "Port": self.ctfm_port,
                    "AllowGet": True,
                    "AllowMove": True,
                    "AllowFind": True,
                    "AllowStore": True,
                }
            },
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
            "HttpTimeout": 30,
        }
        self.config_path = self.folder / "orthanc.json"
        self.process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"dicomweb:{self.http}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://{AET}@127.0.0.1:{self.dicom_port}"

    def start(self, timeout_s: float = 60.0) -> Orthanc:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([self.binary, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.folder / 'orthanc.log'}")
            try:
                self.rest("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def rest(self, path: str, method: str = "GET", data: bytes | None = None):
        request = urllib.request.Request(self.http + path, method=method, data=data)
        request.add_header("Authorization", "Basic " + b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def upload(self, files) -> None:
        files = [str(f) for f in files]
        subprocess.run(
            ["storescu", "-aec", AET, "127.0.0.1", str(self.dicom_port), *files],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def count_instances(self) -> int:
        return int(self.rest("/statistics")["CountInstances"])

    def series_instances(self, series_uid: str) -> list[str]:
        """Orthanc's ids of the instances of a series."""
        found = self.rest("/tools/lookup", method="POST", data=series_uid.encode())
        series_id = next(item["ID"] for item in found if item["Type"] == "Series")
        return list(self.rest(f"/series/{series_id}")["Instances"])


class TLSProxy:
    """HTTPS in front of Orthanc's HTTP port (Debian's Orthanc build crashes serving TLS itself): a
    real TLS server on 127.0.0.1 with a fresh self-signed certificate (openssl), forwarding bytes.
    ``ca_file`` is the certificate a client must be given; ``dicomweb`` the https address."""

    def __init__(self, folder: Path, target_port: int):
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed (needed for the TLS test)")
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_file, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(self.ca_file)]
            + ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(self.ca_file), str(key))
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dicomweb = f"dicomweb:https://127.0.0.1:{self.port}/dicom-web"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):  # the client refused our certificate: that is the point
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pump(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, tls), daemon=True).start()
        pump(tls, upstream)

    def close(self) -> None:
        self.listener.close()
