"""Bounded loopback load: 50 concurrent clients scan and confirm; no errors, nothing lost.
Correctness only; throughput and latency are measured by benchmarks/demo_load.py."""

from __future__ import annotations

import sqlite3

import pytest

from benchmarks.loadtest import run_load

CLIENTS, SCANS_EACH = 50, 4
PHOTOS = ["train/Fruit/Banana/Banana_001.jpg", "train/Fruit/Apple/Granny-Smith/Granny-Smith_001.jpg",
          "train/Vegetables/Tomato/Regular-Tomato/Regular-Tomato_001.jpg", "train/Packages/Milk/Arla-Standard-Milk/Arla-Standard-Milk_001.jpg"]


@pytest.mark.slow
def test_fifty_concurrent_clients_lose_no_confirmed_scan(start_demo, demo_classifier, grocery_root):
    images = [(grocery_root / p).read_bytes() for p in PHOTOS]
    run = start_demo(demo_classifier, token="load-token")
    res = run_load(run.url, images, clients=CLIENTS, scans_per_client=SCANS_EACH, token="load-token")
    assert res.errors == []
    assert len(res.confirmed_ids) == len(set(res.confirmed_ids)) == CLIENTS * SCANS_EACH
    # Read back through a fresh connection: every confirmed scan is there, confirmed, with its trail.
    conn = sqlite3.connect(run.db)
    try:
        logged = dict(conn.execute("SELECT id, action FROM scans").fetchall())
        trail = conn.execute("SELECT COUNT(*) FROM scan_actions WHERE action = 'confirmed'").fetchone()[0]
        per_client = conn.execute("SELECT COUNT(DISTINCT operator) FROM scans").fetchone()[0]
    finally:
        conn.close()
    assert {i: logged.get(i) for i in res.confirmed_ids} == {i: "confirmed" for i in res.confirmed_ids}
    assert len(logged) == trail == CLIENTS * SCANS_EACH and per_client == CLIENTS
