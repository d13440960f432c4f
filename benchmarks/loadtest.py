"""A loopback load generator for the demo server: N concurrent clients, each scanning and confirming a
fixed number of photos. Used by the load test (tests/demo/test_load.py, correctness) and
`benchmarks/demo_load.py` (speed). Standard library only, so it measures the server and not a client library.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    clients: int
    scans_per_client: int
    wall_s: float = 0.0
    classify_ms: list[float] = field(default_factory=list)   # POST /api/scans, per request
    confirm_ms: list[float] = field(default_factory=list)    # POST /api/scans/<id>/action
    scan_ms: list[float] = field(default_factory=list)       # both, per scan (what an operator waits)
    confirmed_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def scans(self) -> int:
        return len(self.confirmed_ids)

    @property
    def throughput(self) -> float:
        """Confirmed scans per second over the whole run."""
        return self.scans / self.wall_s if self.wall_s else 0.0

    @staticmethod
    def percentile(values: Sequence[float], q: float) -> float:
        if not values:
            return float("nan")
        v = sorted(values)
        k = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
        return v[k]

    def summary(self) -> dict:
        p = self.percentile
        return {
            "clients": self.clients, "scans_per_client": self.scans_per_client, "scans": self.scans,
            "errors": len(self.errors), "wall_s": round(self.wall_s, 3),
            "throughput_scans_per_s": round(self.throughput, 2),
            "classify_p50_ms": round(p(self.classify_ms, 50), 1), "classify_p95_ms": round(p(self.classify_ms, 95), 1),
            "confirm_p95_ms": round(p(self.confirm_ms, 95), 1),
            "scan_p50_ms": round(p(self.scan_ms, 50), 1), "scan_p95_ms": round(p(self.scan_ms, 95), 1),
        }


def _multipart(image: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="scan.jpg"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _post(conn: http.client.HTTPConnection, url: str, body: bytes, ctype: str, auth: dict[str, str],
          expect: int) -> bytes:
    conn.request("POST", url, body, {"Content-Type": ctype, **auth})
    r = conn.getresponse()
    data = r.read()
    if r.status != expect:
        raise RuntimeError(f"POST {url} -> {r.status}: {data[:200]!r}")
    return data


def run_load(base_url: str, images: Sequence[bytes], clients: int = 50, scans_per_client: int = 4,
             token: str | None = None, timeout: float = 300.0) -> LoadResult:
    """Start `clients` threads at once; each classifies `scans_per_client` photos (cycling `images`)
    and confirms each one. Every failure is recorded in `errors`, never raised."""
    u = urlsplit(base_url)
    res = LoadResult(clients, scans_per_client)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    auth = {"Authorization": f"Bearer {token}"} if token else {}

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        try:
            start.wait()
            for s in range(scans_per_client):
                img = images[(c * scans_per_client + s) % len(images)]
                body, ctype = _multipart(img, {"station": f"load-{c % 5}", "operator": f"client-{c}"})
                t0 = time.perf_counter()
                try:
                    scan_id = json.loads(_post(conn, "/api/scans", body, ctype, auth, 201))["scan"]["id"]
                    t1 = time.perf_counter()
                    payload = json.dumps({"action": "confirmed", "station": f"load-{c % 5}",
                                          "operator": f"client-{c}"}).encode()
                    _post(conn, f"/api/scans/{scan_id}/action", payload, "application/json", auth, 200)
                    t2 = time.perf_counter()
                    with lock:
                        res.classify_ms.append((t1 - t0) * 1e3)
                        res.confirm_ms.append((t2 - t1) * 1e3)
                        res.scan_ms.append((t2 - t0) * 1e3)
                        res.confirmed_ids.append(scan_id)
                except Exception as e:  # a load client reports, it does not stop the run
                    with lock:
                        res.errors.append(f"client {c} scan {s}: {type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    res.wall_s = time.perf_counter() - t0
    return res
