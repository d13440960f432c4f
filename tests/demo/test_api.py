"""The demo's HTTP API over real HTTP, a real model and real grocery photos; the SQLite file is read
back through its own connection, as a crash-recovered server would see it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from demo import DataFolder, describe, load_classifier
from demo.app import ModelMissingError
from demo.datafolder import OutsideDataFolderError
from demo.storage import ScanNotFoundError

GRANNY = "train/Fruit/Apple/Granny-Smith/Granny-Smith_001.jpg"
TOMATO = "train/Vegetables/Tomato/Regular-Tomato/Regular-Tomato_001.jpg"


def rows(db: Path, sql: str, args=()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_classify_real_photo_is_logged(start_demo, demo_classifier, banana_jpg):
    run = start_demo(demo_classifier)
    image = banana_jpg.read_bytes()
    st, body = run.upload(image, station="dock-3", operator="ana")
    assert st == 201, body
    pred, scan, disp = body["prediction"], body["scan"], body["display"]
    # The answer is the SDK's answer for the same bytes.
    direct = demo_classifier.classify(image)
    assert [p["label"] for p in pred["full_path"]] == [p.label for p in direct.full_path]
    assert [c["label"] for c in disp["crumbs"]] == [p["label"] for p in pred["path"]]
    assert scan["image_sha256"] == hashlib.sha256(image).hexdigest()
    assert scan["model_sha256"] == demo_classifier.manifest.sha256
    assert (scan["station"], scan["operator"], scan["action"]) == ("dock-3", "ana", None)
    # Committed: visible to another connection; the image is stored under the data folder.
    [row] = rows(run.db, "SELECT * FROM scans")
    assert row["id"] == scan["id"] and row["action"] is None
    assert json.loads(row["prediction"])["full_path"] == pred["full_path"]
    assert set(json.loads(row["confidences"])) == set(demo_classifier.taxonomy.level_names)
    stored = run.data.resolve(row["image_file"])
    assert stored.read_bytes() == image and run.data.root in stored.parents


def test_confirm_correct_reject(start_demo, demo_classifier, grocery_root, banana_jpg):
    run = start_demo(demo_classifier)
    ids = []
    for rel in (str(banana_jpg.relative_to(grocery_root)), GRANNY, TOMATO):
        st, body = run.upload((grocery_root / rel).read_bytes())
        assert st == 201, body
        ids.append(body["scan"])
    a, b, c = ids

    st, body = run.json("POST", f"/api/scans/{a['id']}/action", {"action": "confirmed", "station": "s", "operator": "o"})
    assert st == 200 and body["scan"]["action"] == "confirmed"
    assert body["scan"]["final_path"] == a["predicted_path"] and body["scan"]["final_level"] == a["predicted_level"]

    st, body = run.json("POST", f"/api/scans/{b['id']}/action",
                        {"action": "corrected", "label": ["Fruit", "Apple", "Granny-Smith"]})
    assert st == 200 and body["scan"]["final_path"] == "Fruit > Apple > Granny-Smith"
    # A correction may stop at a coarser level ("an apple, variety unknown"); the latest action wins.
    st, body = run.json("POST", f"/api/scans/{b['id']}/action", {"action": "corrected", "label": ["Fruit", "Apple"]})
    assert st == 200 and (body["scan"]["final_path"], body["scan"]["final_level"]) == ("Fruit > Apple", 1)

    st, body = run.json("POST", f"/api/scans/{c['id']}/action", {"action": "rejected"})
    assert st == 200 and body["scan"]["action"] == "rejected" and body["scan"]["final_path"] is None

    bad = [
        ({"action": "corrected", "label": ["Fruit", "Pear", "Granny-Smith"]}, 400, "not under"),
        ({"action": "corrected", "label": ["Fruit", "Durian"]}, 400, "not a coarse"),
        ({"action": "corrected", "label": "Fruit"}, 400, "list"),
        ({"action": "deleted"}, 400, "action must be"),
        ({"action": "corrected", "label": ["Fruit"], "operator": "x" * 65}, 400, "longer than"),
    ]
    for payload, status, words in bad:
        st, body = run.json("POST", f"/api/scans/{b['id']}/action", payload)
        assert st == status and words in body["error"], (payload, body)
    st, _, raw = run.request("POST", f"/api/scans/{b['id']}/action", b"{not json", {"Content-Type": "application/json"})
    assert st == 400
    st, body = run.json("POST", "/api/scans/no-such-id/action", {"action": "confirmed"})
    assert st == 404 and "no scan" in body["error"]

    # What SQLite holds: latest action per scan, and the full trail (b: two corrections, rejected ones none).
    got = {r["id"]: (r["action"], r["final_path"]) for r in rows(run.db, "SELECT * FROM scans")}
    assert got == {a["id"]: ("confirmed", a["predicted_path"]), b["id"]: ("corrected", "Fruit > Apple"),
                   c["id"]: ("rejected", None)}
    trail = rows(run.db, "SELECT action, final_path FROM scan_actions WHERE scan_id = ? ORDER BY created_at", (b["id"],))
    assert [tuple(r) for r in trail] == [("corrected", "Fruit > Apple > Granny-Smith"), ("corrected", "Fruit > Apple")]
    st, body = run.json("GET", f"/api/scans/{b['id']}")
    assert st == 200 and len(body["actions"]) == 2 and body["scan"]["prediction"]["full_path"]


def test_list_filters_and_csv_export(start_demo, demo_classifier, banana_jpg):
    run = start_demo(demo_classifier)
    image = banana_jpg.read_bytes()
    made = []
    for station, operator, action in [("s1", "ana", "confirmed"), ("s1", "bo", "rejected"),
                                      ("s2", "=HYPERLINK(1)", "confirmed"), ("s2", "ana", None)]:
        st, body = run.upload(image, station=station, operator=operator)
        assert st == 201
        made.append(body["scan"]["id"])
        if action:
            assert run.json("POST", f"/api/scans/{body['scan']['id']}/action", {"action": action})[0] == 200

    def listed(q: str) -> tuple[int, list[str]]:
        st, body = run.json("GET", "/api/scans" + q)
        assert st == 200, body
        return body["total"], [s["id"] for s in body["scans"]]

    assert listed("") == (4, made[::-1])  # newest first
    assert listed("?action=confirmed")[0] == 2
    assert listed("?action=pending") == (1, [made[3]])
    assert listed("?station=s1&operator=bo") == (1, [made[1]])
    assert listed("?limit=2&offset=1") == (4, made[::-1][1:3])
    assert listed("?since=2000-01-01&until=2999-01-01")[0] == 4 and listed("?until=2000-01-01")[0] == 0
    label = run.json("GET", f"/api/scans/{made[0]}")[1]["scan"]["predicted_path"].split(" > ")[-1]
    assert listed("?label=" + label)[0] == 4 and listed("?label=NoSuchLabel%25")[0] == 0
    assert run.json("GET", "/api/scans?action=bogus")[0] == 400
    assert run.json("GET", "/api/scans?limit=abc")[0] == 400

    st, headers, data = run.request("GET", "/api/export.csv")
    assert st == 200 and headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(data.decode())))
    assert [r["id"] for r in table] == made  # oldest first
    assert {r["image_sha256"] for r in table} == {hashlib.sha256(image).hexdigest()}
    assert table[2]["operator"] == "'=HYPERLINK(1)"  # no formula when opened in a spreadsheet
    assert json.loads(table[0]["prediction"])["full_path"]
    st, _, data = run.request("GET", "/api/export.csv?action=rejected")
    assert [r["id"] for r in csv.DictReader(io.StringIO(data.decode()))] == [made[1]]


def test_dataset_export_reads_as_grocery_split(start_demo, demo_classifier, grocery_root, banana_jpg, tmp_path):
    from sdk.datasets import read_grocery

    run = start_demo(demo_classifier)
    banana, granny, tomato = banana_jpg.read_bytes(), (grocery_root / GRANNY).read_bytes(), (grocery_root / TOMATO).read_bytes()
    st, b1 = run.upload(banana)
    run.json("POST", f"/api/scans/{b1['scan']['id']}/action", {"action": "corrected", "label": ["Fruit", "Banana", "Banana"]})
    st, g = run.upload(granny)
    # Confirmed, then corrected: the latest label is the one exported.
    run.json("POST", f"/api/scans/{g['scan']['id']}/action", {"action": "confirmed"})
    run.json("POST", f"/api/scans/{g['scan']['id']}/action",
             {"action": "corrected", "label": ["Fruit", "Apple", "Granny-Smith"]})
    st, t = run.upload(tomato)
    run.json("POST", f"/api/scans/{t['scan']['id']}/action", {"action": "rejected"})
    st, c = run.upload(tomato)
    run.json("POST", f"/api/scans/{c['scan']['id']}/action", {"action": "corrected", "label": ["Vegetables", "Tomato"]})
    run.upload(banana)  # pending: not exported

    st, body = run.json("POST", "/api/export/dataset")
    assert st == 200, body
    assert (body["count"], body["skipped"]) == (2, 1)  # the coarse-only correction cannot be a fine label
    out = Path(body["directory"])
    assert run.data.root in out.parents
    lines = (out / "train.txt").read_text().splitlines()
    assert len(lines) == 2 and all(len(l.split(", ")) == 3 for l in lines)

    tax = demo_classifier.taxonomy
    ds = read_grocery(out, "train", tax)
    want = {hashlib.sha256(banana).hexdigest(): ("Fruit", "Banana", "Banana"),
            hashlib.sha256(granny).hexdigest(): ("Fruit", "Apple", "Granny-Smith")}
    got = {}
    for s in ds.samples:
        p = Path(s.source)
        got[p.stem] = tuple(tax.path(tax.depth - 1, s.labels[-1]))
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.stem  # the photo itself, unchanged
    assert got == want
    # classes.csv makes it a Grocery root: the same taxonomy, read back the way training reads it.
    from sdk import Taxonomy
    assert Taxonomy.from_grocery(out) == tax


def _png_declaring(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h pixels (a decompression bomb, without the bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_uploads_are_refused_and_the_server_stays_up(start_demo, demo_classifier, banana_jpg, tmp_path):
    run = start_demo(demo_classifier, max_upload_mb=1)
    jpeg = banana_jpg.read_bytes()
    pdf = tmp_path / "x.pdf"
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(pdf)
    cases = [
        (b"", "empty.jpg", 400, "invalid_image"),
        (b"hello, this is text\n" * 10, "notes.jpg", 400, "invalid_image"),
        (jpeg[: len(jpeg) // 3], "truncated.jpg", 400, "invalid_image"),
        (pdf.read_bytes(), "scan.jpg", 415, "unsupported_format"),
        (_png_declaring(30000, 30000), "bomb.png", 400, "invalid_image"),
    ]
    for data, name, status, kind in cases:
        st, body = run.upload(data, filename=name)
        assert (st, body["kind"]) == (status, kind), (name, body)
        assert body["error"]
    # Over the cap: 413 before any decoding.
    st, body = run.upload(jpeg + b"\0" * (1024 * 1024), filename="huge.jpg")
    assert st == 413 and "1 MB" in body["error"]
    # Not multipart at all / no image field / silly form fields.
    st, _, raw = run.request("POST", "/api/scans", b"\x00\x01garbage", {"Content-Type": "multipart/form-data; boundary=zz"})
    assert st == 400 and json.loads(raw)["error"]
    st, _, raw = run.request("POST", "/api/scans", b"x=1", {"Content-Type": "application/x-www-form-urlencoded"})
    assert st == 400 and "no image" in json.loads(raw)["error"]
    st, body = run.upload(jpeg, station="bad\x00station")
    assert st == 400 and "control characters" in body["error"]
    st, _, raw = run.request("GET", "/api/nothing-here")
    assert st == 404 and json.loads(raw)["kind"] == "not_found"
    # Nothing was logged or stored for any of them, and the server still serves.
    assert rows(run.db, "SELECT COUNT(*) FROM scans")[0][0] == 0
    assert not (run.data.root / "images").exists()
    st, body = run.upload(jpeg)
    assert st == 201


def test_token_is_required_on_every_api_call(start_demo, demo_classifier, banana_jpg):
    run = start_demo(demo_classifier, token="s3cret-token")
    calls = [("GET", "/api/info"), ("GET", "/api/taxonomy"), ("GET", "/api/scans"), ("GET", "/api/export.csv"),
             ("POST", "/api/export/dataset"), ("POST", "/api/scans/x/action"), ("GET", "/api/scans/x/image")]
    for method, path in calls:
        for tok in (None, "wrong", "s3cret-token "):
            st, _, raw = run.request(method, path, token=tok)
            assert st == 401 and json.loads(raw)["kind"] == "unauthorized", (method, path, tok)
    st, body = run.upload(banana_jpg.read_bytes(), token=None)
    assert st == 401
    assert rows(run.db, "SELECT COUNT(*) FROM scans")[0][0] == 0
    # With the token (Bearer or X-Token) it works; the page shells need none (they ask for it).
    st, body = run.upload(banana_jpg.read_bytes())
    assert st == 201
    assert run.request("GET", "/api/info", headers={"X-Token": "s3cret-token"}, token=None)[0] == 200
    st, headers, page = run.request("GET", "/", token=None)
    assert st == 200 and b"hierfg scanner" in page and "default-src 'self'" in headers["content-security-policy"]


def test_backoff_and_unknown_are_shown_plainly(start_demo, model_with_decoding, banana_jpg):
    image = banana_jpg.read_bytes()
    # The fine level can never clear 1.0: the answer backs off to the coarse node.
    clf = load_classifier(model_with_decoding({"thresholds": [0.0, 0.0, 1.0]}))
    run = start_demo(clf, name="backoff")
    st, body = run.upload(image)
    d = body["display"]
    coarse = body["prediction"]["full_path"][1]["label"]
    assert d["status"] == "backoff" and d["headline"] == f"{coarse} — variety uncertain"
    assert [c["label"] for c in d["crumbs"]] == [p["label"] for p in body["prediction"]["full_path"][:2]]
    assert d["can_confirm"] and all(c["path"][1] == coarse for c in d["candidates"])
    st, res = run.json("POST", f"/api/scans/{body['scan']['id']}/action", {"action": "confirmed"})
    assert res["scan"]["final_level"] == 1
    st, exp = run.json("POST", "/api/export/dataset")
    assert (exp["count"], exp["skipped"]) == (0, 1)

    clf = load_classifier(model_with_decoding({"thresholds": [1.0, 1.0, 1.0]}))
    run = start_demo(clf, name="uncertain")
    st, body = run.upload(image)
    assert body["display"]["status"] == "uncertain" and not body["display"]["can_confirm"]
    st, res = run.json("POST", f"/api/scans/{body['scan']['id']}/action", {"action": "confirmed"})
    assert st == 400 and "nothing to confirm" in res["error"]

    clf = load_classifier(model_with_decoding({"unknown_threshold": 0.0}))
    run = start_demo(clf, name="unknown")
    st, body = run.upload(image)
    assert body["display"]["status"] == "unknown" and body["display"]["headline"].startswith("Unknown item")
    assert body["display"]["crumbs"] == [] and not body["display"]["can_confirm"]
    assert rows(run.db, "SELECT is_unknown FROM scans")[0][0] == 1


def test_describe_headlines(demo_classifier, banana_jpg):
    tax = demo_classifier.taxonomy
    full = demo_classifier.classify(banana_jpg, thresholds=[0.0, 0.0, 0.0])
    d = describe(full, tax)
    assert d["status"] == "complete" and d["headline"] == full.full_path[-1].label
    back = demo_classifier.classify(banana_jpg, thresholds=[0.0, 1.0, 1.0])
    d = describe(back, tax)
    assert d["status"] == "backoff" and d["headline"] == f"{back.full_path[0].label} — type uncertain"
    assert d["next_level"] == "coarse"


def test_missing_model_names_the_command(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(ModelMissingError, match="python -m quantize"):
        load_classifier(missing)
    r = subprocess.run([sys.executable, "-m", "demo", "--model", str(missing), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "python -m quantize" in r.stderr and str(missing) in r.stderr


def test_data_folder_refuses_paths_outside(tmp_path):
    data = DataFolder(tmp_path / "data")
    for rel in ("../escape.jpg", "/etc/passwd", "images/../../x"):
        with pytest.raises(OutsideDataFolderError):
            data.resolve(rel)
    with pytest.raises(ValueError):
        data.save_image(b"\xff\xd8\xff", "../../" + "a" * 58)
    with pytest.raises(ValueError):
        data.export_dataset(None, None, name="../../oops")  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_store_commits_each_scan_and_rolls_back_failed_actions(tmp_path):
    from demo import Scan, ScanFilter, SQLiteScanStore

    db = tmp_path / "log.sqlite"
    store = SQLiteScanStore(db)
    scan = store.add_scan(Scan("a" * 64, "images/aa/x.jpg", "m" * 64, "t" * 64, "s", "o", "Fruit > Apple", 1, 0.9,
                               False, {"category": 0.99, "coarse": 0.9}, {"path": []}))
    # Visible to a second connection before this one is closed: it was committed, not just buffered.
    assert rows(db, "SELECT id FROM scans")[0][0] == scan.id
    with pytest.raises(ScanNotFoundError):
        store.record_action("missing", "confirmed", None, None, "s", "o")
    with pytest.raises(ValueError):
        store.record_action(scan.id, "approved", None, None, "s", "o")
    assert rows(db, "SELECT COUNT(*) FROM scan_actions")[0][0] == 0
    store.record_action(scan.id, "confirmed", "Fruit > Apple", 1, "s", "o")
    assert rows(db, "SELECT action FROM scans")[0][0] == "confirmed"
    assert store.count(ScanFilter(label="50%_off")) == 0 and store.count(ScanFilter(label="Apple")) == 1
    store.close()
    again = SQLiteScanStore(db)  # reopening keeps everything
    assert again.get(scan.id).action == "confirmed" and again.get(scan.id).confidences["coarse"] == 0.9
    again.close()


def test_an_internal_failure_is_answered_and_the_server_goes_on(start_demo, demo_classifier, banana_jpg, monkeypatch):
    run = start_demo(demo_classifier)

    def disk_full(scan):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(run.store, "add_scan", disk_full)
        st, body = run.upload(banana_jpg.read_bytes())
    assert st == 500 and body["kind"] == "internal" and "OSError" in body["error"]
    st, body = run.upload(banana_jpg.read_bytes())
    assert st == 201 and rows(run.db, "SELECT COUNT(*) FROM scans")[0][0] == 1
