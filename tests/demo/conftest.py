"""Demo fixtures: the real tiny ONNX model served over real HTTP on a free loopback port."""

from __future__ import annotations

import http.client
import json
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest

from demo import DataFolder, DemoConfig, DemoServer, SQLiteScanStore, create_app, load_classifier


@dataclass
class Running:
    server: DemoServer
    store: SQLiteScanStore
    data: DataFolder
    db: Path
    token: str | None

    @property
    def url(self) -> str:
        return self.server.url

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                token: Any = ...) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request; sends the server's token unless `token` says otherwise."""
        u = urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        h = dict(headers or {})
        tok = self.token if token is ... else token
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        try:
            conn.request(method, path, body, h)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, payload: Any = None, **kw) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        st, _, data = self.request(method, path, body, {"Content-Type": "application/json"}, **kw)
        return st, json.loads(data)

    def upload(self, image: bytes, filename: str = "scan.jpg", station: str = "st-1", operator: str = "op-1",
               **kw) -> tuple[int, Any]:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in (("station", station), ("operator", operator))]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        st, _, data = self.request("POST", "/api/scans", b"".join(parts),
                                   {"Content-Type": f"multipart/form-data; boundary={boundary}"}, **kw)
        return st, json.loads(data)


@pytest.fixture(scope="session")
def demo_classifier(onnx_artifact_dir):
    return load_classifier(onnx_artifact_dir)


@pytest.fixture
def start_demo(tmp_path) -> Callable[..., Running]:
    """Start a server (own data folder and SQLite file) on 127.0.0.1:<free port>; stopped after the test."""
    started: list[Running] = []

    def start(classifier, token: str | None = None, max_upload_mb: float = 4.0, name: str = "data") -> Running:
        data = DataFolder(tmp_path / name)
        db = data.resolve("scans.sqlite")
        store = SQLiteScanStore(db)
        app = create_app(classifier, store, data, DemoConfig(token, max_upload_mb))
        run = Running(DemoServer(app, "127.0.0.1", 0).start(), store, data, db, token)
        started.append(run)
        return run

    yield start
    for run in started:
        run.server.stop()
        run.store.close()


@pytest.fixture
def model_with_decoding(tmp_path, onnx_artifact_dir) -> Callable[[dict], Path]:
    """A copy of the tiny model whose manifest carries the given `decoding` section (thresholds,
    unknown_threshold), as a calibrated model would."""
    def make(decoding: dict) -> Path:
        out = tmp_path / f"model-{uuid.uuid4().hex[:8]}"
        shutil.copytree(onnx_artifact_dir, out)
        m = json.loads((out / "manifest.json").read_text())
        m["decoding"] = {**m.get("decoding", {}), **decoding}
        (out / "manifest.json").write_text(json.dumps(m, indent=1))
        return out
    return make


def _rows(db: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def db_rows() -> Callable[[Path, str], list[sqlite3.Row]]:
    """Rows of one query on a demo run's SQLite log, read the way an operator's tool would."""
    return _rows
