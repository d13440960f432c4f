"""`python -m demo`: serve the warehouse-scanner page on the LAN; `python -m demo export-dataset`:
write confirmed and corrected scans as a Grocery-style dataset."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from .app import DEFAULT_MODEL, DemoServer, ModelMissingError, load_classifier, open_demo, open_store
from .datafolder import DataFolder


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="exported model folder (model file + manifest.json); default: the bundled demo/model")
    p.add_argument("--data-dir", default="demo-data",
                   help="folder for everything the server writes: images, the scan log, exports (default ./demo-data)")
    p.add_argument("--db", default="scans.sqlite",
                   help="SQLite scan log; a relative path lives in the data folder (default scans.sqlite)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _export(argv[1:]) if argv[:1] == ["export-dataset"] else _serve(argv)
    except ModelMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m demo", description="Warehouse-scanner demo web app.")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for the LAN (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="shared token every API call must carry (recommended on a LAN)")
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="upload size cap in MB (default 16)")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: the runtime's)")
    p.add_argument("--cert", help="TLS certificate (PEM); with --key serves https, which phone browsers "
                                  "require for live camera preview on a LAN address")
    p.add_argument("--key", help="TLS private key (PEM)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(a.cert) != bool(a.key):
        p.error("--cert and --key go together")
    app, store = open_demo(a.model, a.data_dir, a.db, a.token, a.max_upload_mb, a.threads)
    server = DemoServer(app, a.host, a.port, ssl_context=(a.cert, a.key) if a.cert else None)
    print(f"serving {server.url}/ (model {Path(a.model).resolve()}, data in {Path(a.data_dir).resolve()}"
          f"{', token required' if a.token else ''}); Ctrl-C to stop", flush=True)
    with contextlib.closing(store), contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m demo export-dataset",
                                description="Write confirmed and corrected scans as a Grocery-style dataset "
                                            "(train.txt + images) under <data-dir>/exports/.")
    _common(p)
    p.add_argument("--name", help="export folder name (default dataset-<UTC time>)")
    a = p.parse_args(argv)
    clf = load_classifier(a.model)
    data = DataFolder(a.data_dir)
    with contextlib.closing(open_store(data, a.db)) as store:
        res = data.export_dataset(store, clf.taxonomy, a.name)
    print(f"wrote {res.count} labelled images to {res.split_file} ({res.skipped} scans skipped: "
          "not labelled down to the finest level)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
