"""Load benchmark of the demo server on loopback: N concurrent clients, each scanning and confirming
M real grocery photos. Prints throughput (confirmed scans/s) and latency percentiles.

    python benchmarks/demo_load.py --model demo/model --clients 50 --scans 4

Starts the server in-process (werkzeug threaded, a temporary data folder and SQLite log) unless --url
points at a running one. The test suite checks correctness of the same run (tests/demo/test_load.py);
timings live here only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo.app import DEFAULT_MODEL, DemoServer, open_demo  # noqa: E402
from benchmarks.loadtest import run_load  # noqa: E402

PHOTOS = ["train/Fruit/Banana/Banana_001.jpg", "train/Fruit/Apple/Granny-Smith/Granny-Smith_001.jpg",
          "train/Vegetables/Tomato/Regular-Tomato/Regular-Tomato_001.jpg",
          "train/Packages/Milk/Arla-Standard-Milk/Arla-Standard-Milk_001.jpg"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="exported model folder (default demo/model)")
    p.add_argument("--data", default=os.environ.get("HIERFG_GROCERY", str(ROOT.parent / "shared/datasets/grocery-store")),
                   help="Grocery Store root (photos to scan)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--scans", type=int, default=4, help="scans per client")
    p.add_argument("--threads", type=int, default=None, help="inference threads of the server's runtime")
    p.add_argument("--url", help="benchmark a running server instead (its model and settings)")
    p.add_argument("--token", default=None)
    p.add_argument("--json", help="also write the summary as JSON here")
    a = p.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request would be measured too
    images = [(Path(a.data) / ph).read_bytes() for ph in PHOTOS]
    server = store = None
    with tempfile.TemporaryDirectory(prefix="demo-load-") as tmp:
        url = a.url
        if not url:
            app, store = open_demo(a.model, tmp, "scans.sqlite", a.token, 16.0, a.threads)
            server = DemoServer(app, "127.0.0.1", 0).start()
            url = server.url
        try:
            run_load(url, images, clients=2, scans_per_client=2, token=a.token)  # warm-up
            res = run_load(url, images, clients=a.clients, scans_per_client=a.scans, token=a.token)
        finally:
            if server:
                server.stop()
            if store:
                store.close()
    s = res.summary()
    s["model"] = a.url or str(Path(a.model).resolve())
    s["cpu_count"] = os.cpu_count()
    print(f"{s['clients']} clients x {s['scans_per_client']} scans: {s['scans']} confirmed, {s['errors']} errors "
          f"in {s['wall_s']:.2f} s")
    print(f"throughput {s['throughput_scans_per_s']:.1f} scans/s | classify p50 {s['classify_p50_ms']:.0f} ms "
          f"p95 {s['classify_p95_ms']:.0f} ms | confirm p95 {s['confirm_p95_ms']:.0f} ms | "
          f"scan (classify+confirm) p50 {s['scan_p50_ms']:.0f} ms p95 {s['scan_p95_ms']:.0f} ms")
    for e in res.errors[:5]:
        print("error:", e)
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
