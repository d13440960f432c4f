"""The "new product" flow of the scanner: 5 photos + name + parent over HTTP (and in a real browser from
the Correct… picker), the product recognized from then on, the event in the SQLite log."""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from pathlib import Path

import pytest

from demo import load_classifier

NEW = "Granny-Smith-Organic"


@pytest.fixture
def own_classifier(onnx_artifact_dir, tmp_path):
    """A classifier on a private copy of the model: enrolling writes enrolled.json beside it."""
    d = tmp_path / "model"
    shutil.copytree(onnx_artifact_dir, d)
    return load_classifier(d)


@pytest.fixture(scope="module")
def photos(grocery_root) -> list[Path]:
    return sorted((grocery_root / "train/Fruit/Apple/Granny-Smith").glob("*.jpg"))[-5:]


def post_enroll(run, photos: list[bytes], label=NEW, parent="Apple", station="st-1", operator="op-1"):
    boundary = uuid.uuid4().hex
    fields = [("label", label), ("parent", parent), ("station", station), ("operator", operator)]
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    for i, p in enumerate(photos):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="p{i}.jpg"\r\n'
                     "Content-Type: image/jpeg\r\n\r\n".encode() + p + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    st, _, data = run.request("POST", "/api/enrollments", b"".join(parts),
                              {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return st, json.loads(data)


EVENTS = "SELECT * FROM enrollment_events ORDER BY created_at"


def test_enroll_over_http_extends_the_tree_and_logs_the_event(db_rows, start_demo, own_classifier, photos):
    run = start_demo(own_classifier)
    st, j = run.json("GET", "/api/enrollments")
    assert st == 200 and j["can_enroll"] and j["min_photos"] == 5 and ["Fruit", "Apple"] in j["parents"]
    st, j = post_enroll(run, [p.read_bytes() for p in photos])
    assert st == 201, j
    assert j["path"] == ["Fruit", "Apple", NEW] and j["event"]["event"] == "enrolled"
    _, tax = run.json("GET", "/api/taxonomy")
    apple = next(c for c in next(n for n in tax["tree"] if n["name"] == "Fruit")["children"] if c["name"] == "Apple")
    assert NEW in [c["name"] for c in apple["children"]] and tax["enrolled"] == [NEW]
    st, j = run.upload(photos[0].read_bytes())
    assert st == 201 and j["display"]["full_path"][-1]["label"] == NEW
    # a scan may now be corrected to the new product
    st, j = run.json("POST", f"/api/scans/{j['scan']['id']}/action",
                     {"action": "corrected", "label": ["Fruit", "Apple", NEW], "station": "st-1", "operator": "op-1"})
    assert st == 200 and j["scan"]["final_path"] == f"Fruit > Apple > {NEW}"
    [row] = db_rows(run.db, EVENTS)
    assert (row["event"], row["label"], row["parent"], row["station"]) == ("enrolled", NEW, "Apple", "st-1")
    assert all(run.data.resolve(f).is_file() for f in json.loads(row["photos"]))
    st, j = run.json("POST", f"/api/enrollments/{NEW}/forget", {"station": "st-2", "operator": "op-2"})
    assert st == 200 and j["event"]["event"] == "forgotten"
    assert [r["event"] for r in db_rows(run.db, EVENTS)] == ["enrolled", "forgotten"]
    assert run.json("GET", "/api/taxonomy")[1]["enrolled"] == []


def test_bad_enrollment_requests_get_a_message_and_change_nothing(db_rows, start_demo, own_classifier, photos, tmp_path):
    run = start_demo(own_classifier)
    good = [p.read_bytes() for p in photos]
    st, j = post_enroll(run, good[:3])
    assert st == 400 and "5 to 10 photos" in j["error"]
    st, j = post_enroll(run, good, parent="Nowhere")
    assert st == 400 and j["kind"] == "enrollment" and "Nowhere" in j["error"]
    st, j = post_enroll(run, good, label="Granny-Smith")
    assert st == 400 and "already exists" in j["error"]
    st, j = post_enroll(run, [*good[:4], b"not a photo"])
    assert st == 400 and j["kind"] == "invalid_image" and "image 4" in j["error"]
    st, j = post_enroll(run, good, label=" ")
    assert st == 400 and "product name is missing" in j["error"]
    st, j = run.json("POST", "/api/enrollments/Nothing/forget", {})
    assert st == 404
    assert db_rows(run.db, EVENTS) == [] and own_classifier.enrolled == ()


@pytest.mark.slow
def test_new_product_from_the_correct_screen_in_a_browser(db_rows, start_demo, own_classifier, photos):
    pytest.importorskip("playwright")
    from benchmarks.screenshots import CHROMIUM, launch_chromium, phone_page, scan
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: run tests/demo/install_browser.sh")
    run = start_demo(own_classifier)
    with sync_playwright() as pw:
        b = launch_chromium(pw)
        page = phone_page(b, run.url, station="dock-7", operator="li")
        scan(page, photos[0])
        page.click("#correct")
        page.wait_for_selector("#picker[open]")
        page.click("#picker-new")
        page.wait_for_selector("#enroll[open]")
        assert page.inner_text("#enroll-count") == "1"  # the scanned photo counts
        page.fill("#enroll-label", NEW)
        page.select_option("#enroll-parent", "Apple")
        page.set_input_files("#enroll-file", [str(p) for p in photos[1:]])
        assert page.inner_text("#enroll-count") == "5" and page.is_enabled("#enroll-save")
        page.click("#enroll-save")
        page.wait_for_selector("#done:not(.hidden)")
        assert f"Corrected to Fruit > Apple > {NEW}" in page.inner_text("#done")
        b.close()
    [row] = db_rows(run.db, EVENTS)
    assert (row["event"], row["label"], row["station"], row["operator"]) == ("enrolled", NEW, "dock-7", "li")
    assert [c.label for c in own_classifier.enrolled] == [NEW]


def test_log_page_fetches_the_enrollment_events(start_demo, own_classifier, photos):
    run = start_demo(own_classifier)
    st, _, html = run.request("GET", "/scans")
    assert st == 200 and b'id="events"' in html and b"/static/scans.js" in html
    st, _, js = run.request("GET", "/static/scans.js")
    assert st == 200 and b'api("/api/enrollments")' in js and b"loadEvents();" in js
    assert post_enroll(run, [p.read_bytes() for p in photos])[0] == 201
    assert run.json("POST", f"/api/enrollments/{NEW}/forget", {"station": "st-2", "operator": "op-2"})[0] == 200
    events = run.json("GET", "/api/enrollments")[1]["events"]  # what the page lists, newest first
    assert [(e["event"], e["label"], e["parent"], len(e["photos"])) for e in events] == \
        [("forgotten", NEW, "Apple", 0), ("enrolled", NEW, "Apple", 5)]


@pytest.mark.slow
def test_log_page_lists_enrollment_events_in_a_browser(start_demo, own_classifier, photos):
    pytest.importorskip("playwright")
    from benchmarks.screenshots import CHROMIUM, launch_chromium, phone_page
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: run tests/demo/install_browser.sh")
    run = start_demo(own_classifier, token="t0ken")
    assert post_enroll(run, [p.read_bytes() for p in photos], station="dock-7", operator="li")[0] == 201
    assert run.json("POST", f"/api/enrollments/{NEW}/forget", {"station": "dock-8", "operator": "bo"})[0] == 200
    events = run.json("GET", "/api/enrollments")[1]["events"]
    with sync_playwright() as pw:
        b = launch_chromium(pw)
        page = phone_page(b, run.url, token="t0ken")
        page.goto(run.url + "/scans")
        page.wait_for_selector("#events li >> nth=1")
        rows = page.locator("#events li")
        assert [rows.nth(i).get_attribute("data-event") for i in range(rows.count())] == ["forgotten", "enrolled"]
        assert rows.locator(".ev-label").all_inner_texts() == [NEW, NEW]
        assert rows.locator(".ev-parent").all_inner_texts() == ["Apple", "Apple"]
        assert rows.locator(".ev-time").all_inner_texts() == [e["created_at"].replace("T", " ")[:19] for e in events]
        assert rows.nth(1).locator(".ev-photos").inner_text().endswith("5 photos")
        assert rows.nth(0).locator(".ev-photos").count() == 0  # forgetting takes no photo
        assert "dock-8 · bo" in rows.nth(0).inner_text() and "dock-7 · li" in rows.nth(1).inner_text()
        assert page.is_hidden("#events-empty")
        b.close()


def test_scans_answered_while_products_are_enrolled_and_forgotten(start_demo, own_classifier, photos, grocery_root,
                                                                   background_threads):
    """Flask serves requests in threads: a scan classified while another request enrolls or forgets a product
    is described with the tree its answer came from, never a mix (no 500, every path a path of the tree)."""
    run = start_demo(own_classifier)
    images = [photos[0].read_bytes(), (grocery_root / "train/Fruit/Banana/Banana_001.jpg").read_bytes()]
    answers = []

    def scan(k: int, done: threading.Event) -> None:
        while not done.is_set():
            st, j = run.upload(images[k % 2])
            assert st == 201, j
            path = [c["label"] for c in j["display"]["full_path"]]
            probs = [c["probability"] for c in j["display"]["full_path"]]
            assert len(path) == 3 and probs == sorted(probs, reverse=True), path
            assert NEW not in path or path[:2] == ["Fruit", "Apple"], path
            answers.append(path)

    with background_threads(scan, 2):
        for _ in range(3):
            assert post_enroll(run, [p.read_bytes() for p in photos])[0] == 201
            assert run.json("POST", f"/api/enrollments/{NEW}/forget", {})[0] == 200
    assert len(answers) >= 2
