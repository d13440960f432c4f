"""`python -m demo` as a real process, killed with SIGKILL right after a confirm: the scan survives."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_kill_after_confirm_loses_nothing(onnx_artifact_dir, banana_jpg, tmp_path):

    port = free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "demo", "--model", str(onnx_artifact_dir), "--data-dir", str(data),
                             "--port", str(port), "--token", "tk"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                req = urllib.request.Request(base + "/api/info", headers={"Authorization": "Bearer tk"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    pytest.fail(f"server exited: {proc.stdout.read().decode()[-2000:]}")
                time.sleep(0.2)
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"b.jpg\"\r\n\r\n".encode()
                + banana_jpg.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
        req = urllib.request.Request(base + "/api/scans", body, method="POST", headers={
            "Authorization": "Bearer tk", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            scan_id = json.loads(r.read())["scan"]["id"]
        req = urllib.request.Request(base + f"/api/scans/{scan_id}/action", json.dumps({"action": "confirmed"}).encode(),
                                     method="POST", headers={"Authorization": "Bearer tk",
                                                             "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean shutdown, no close()
        proc.wait(timeout=30)
    conn = sqlite3.connect(data / "scans.sqlite")
    try:
        assert conn.execute("SELECT id, action FROM scans").fetchall() == [(scan_id, "confirmed")]
    finally:
        conn.close()
