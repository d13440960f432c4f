"""The warehouse-scanner web app: a Flask app over `sdk.Classifier`, a `SQLScanStore` and a `DataFolder`.

Pages (`/`, `/scans`) are static shells; everything with data goes through `/api/*`, which requires the
shared token when one is configured. Every error answers JSON `{"error": "...", "kind": "..."}` with a
status code; no input can take the server down.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from flask import Flask, Request, Response, jsonify, request, send_file, send_from_directory
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import make_server

import sdk

from .datafolder import DataFolder
from .storage import ACTIONS, PATH_SEP, Scan, ScanFilter, ScanNotFoundError, SQLiteScanStore, SQLScanStore

log = logging.getLogger("demo")
STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MODEL = Path(__file__).resolve().parent / "model"
# What the page says for "the next level is uncertain" ("Apple — variety uncertain").
LEVEL_WORDS = {"category": "category", "coarse": "type", "fine": "variety"}
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Content-Security-Policy":
                    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; style-src 'self'"}
MAX_ID_LEN, MAX_LABEL_LEN = 64, 120
# What the page asks for: fewer photos make a noticeably weaker prototype (research/enrollment.py).
MIN_PHOTOS, MAX_PHOTOS = 5, 10


class ModelMissingError(sdk.ModelNotFoundError):
    """The bundled model (or the --model folder) is not there."""


class DemoError(Exception):
    """An error the API answers with `status`, `kind` and a message meant for the operator."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass(frozen=True)
class DemoConfig:
    token: str | None = None
    max_upload_mb: float = 16.0


def load_classifier(model_dir: str | Path, num_threads: int | None = None) -> sdk.Classifier:
    """Load and verify the model, with a message naming the command that produces a missing one."""
    model_dir = Path(model_dir)
    if not (model_dir / "manifest.json").is_file() and not (model_dir.is_file() and model_dir.suffix == ".json"):
        raise ModelMissingError(
            f"no model at {model_dir} (manifest.json not found). The bundled model is produced by\n"
            f"  python -m quantize --checkpoint <student dir> --data <grocery root> --targets onnx --out {model_dir}\n"
            f"(or, in fp32: python -m converters onnx --checkpoint <student dir> --out {model_dir});\n"
            f"or pass --model DIR pointing at any exported model folder (model file + manifest.json).")
    return sdk.Classifier.load(model_dir, num_threads=num_threads)


def open_store(data: DataFolder, db: str | Path) -> SQLiteScanStore:
    db = Path(db)
    return SQLiteScanStore(db if db.is_absolute() else data.resolve(db))


def level_word(level_name: str) -> str:
    return LEVEL_WORDS.get(level_name, level_name)


def describe(pred: sdk.HierarchicalPrediction, tax: sdk.Taxonomy) -> dict[str, Any]:
    """What the page shows: a headline that says plainly how far the model is sure, the breadcrumb, and
    quick-pick candidates for the level it stopped before."""
    path, depth, fine = list(pred.path), tax.depth, tax.depth - 1
    if pred.is_unknown:
        status, headline, next_level = "unknown", "Unknown item — not in the catalogue", 0
    elif not path:
        status, headline, next_level = "uncertain", "Not sure what this is", 0
    elif len(path) < depth:
        next_level = len(path)
        status, headline = "backoff", f"{path[-1].label} — {level_word(tax.level_names[next_level])} uncertain"
    else:
        status, headline, next_level = "complete", path[-1].label, fine
    # Candidates: finest-level guesses under the last sure node, best first (what a tap would pick).
    prefix = [p.label for p in path] if status in ("backoff", "complete") else []
    top = pred.top_k.get(tax.level_names[fine], ())
    guesses = [(tax.path(fine, tax.index(fine, label)), prob) for label, prob in top]
    cands = [{"path": names, "probability": prob} for names, prob in guesses if names[:len(prefix)] == prefix]
    crumbs = [{"label": p.label, "level": p.level, "probability": p.probability} for p in pred.full_path]
    return {"status": status, "headline": headline, "crumbs": crumbs[:len(path)], "full_path": crumbs,
            "next_level": tax.level_names[next_level], "next_level_word": level_word(tax.level_names[next_level]),
            "candidates": cands[:4], "can_confirm": bool(path) and not pred.is_unknown}


def typed_text(value: Any, what: str, max_len: int, default: str | None = None) -> str:
    """Text an operator typed, stripped and checked; `default` when missing or blank (if there is one)."""
    value = value.strip() if isinstance(value, str) else ""
    if len(value) > max_len:
        raise DemoError(f"{what} is longer than {max_len} characters")
    if any(ord(c) < 32 for c in value):
        raise DemoError(f"{what} contains control characters")
    if not value and default is None:
        raise DemoError(f"{what} is missing")
    return value or default


def station_and_operator(form: Mapping[str, Any]) -> tuple[str, str]:
    return (typed_text(form.get("station"), "station id", MAX_ID_LEN, "unknown"),
            typed_text(form.get("operator"), "operator id", MAX_ID_LEN, "unknown"))


def _validate_path(tax: sdk.Taxonomy, names: Any) -> tuple[str, int]:
    """A root-to-node list of label names from the picker -> (joined path, level)."""
    if not isinstance(names, list) or not names or len(names) > tax.depth or \
            not all(isinstance(n, str) for n in names):
        raise DemoError(f"label must be a list of 1..{tax.depth} label names from the root down")
    parent = None
    for lvl, name in enumerate(names):
        if name not in tax.names(lvl):
            raise DemoError(f"{name!r} is not a {tax.level_names[lvl]} in this model's taxonomy")
        idx = tax.index(lvl, name)
        if lvl and tax.parent(lvl, idx) != parent:
            raise DemoError(f"{name!r} is not under {names[lvl - 1]!r} in the taxonomy")
        parent = idx
    return PATH_SEP.join(names), len(names) - 1


class _InMemoryUploads(Request):
    """Uploads stay in memory (they are capped by MAX_CONTENT_LENGTH) instead of werkzeug's temporary
    files, so the server writes nothing outside its data folder, not even in /tmp."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def create_app(classifier: sdk.Classifier, store: SQLScanStore, data: DataFolder, config: DemoConfig) -> Flask:
    """The Flask app. The caller owns `store` (closes it after the server stops)."""
    app = Flask("demo", static_folder=str(STATIC), static_url_path="/static")
    app.request_class = _InMemoryUploads
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_upload_mb * 1024 * 1024)
    app.add_url_rule("/", "index", lambda: send_from_directory(STATIC, "index.html"))
    app.add_url_rule("/scans", "scans_page", lambda: send_from_directory(STATIC, "scans.html"))
    api = _Api(classifier, store, data, config)
    for rule, method, view in (
        ("/api/info", "GET", api.info), ("/api/taxonomy", "GET", api.taxonomy),
        ("/api/scans", "POST", api.classify), ("/api/scans/<scan_id>/action", "POST", api.action),
        ("/api/scans", "GET", api.list_scans), ("/api/scans/<scan_id>", "GET", api.get_scan),
        ("/api/scans/<scan_id>/image", "GET", api.scan_image), ("/api/export.csv", "GET", api.export_csv),
        ("/api/export/dataset", "POST", api.export_dataset),
        ("/api/enrollments", "GET", api.list_enrollments), ("/api/enrollments", "POST", api.enroll),
        ("/api/enrollments/<label>/forget", "POST", api.forget),
    ):
        app.add_url_rule(rule, view.__name__, view, methods=[method])

    @app.before_request
    def check_token() -> None:
        if config.token and request.path.startswith("/api/"):
            auth = request.headers.get("Authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("X-Token", "")
            if not hmac.compare_digest(given.encode(), config.token.encode()):
                raise DemoError("this server needs the shared token: enter it in Settings", 401, "unauthorized")

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers.update(SECURITY_HEADERS)
        if request.path.startswith("/api/"):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.errorhandler(Exception)
    def answer(e: Exception):
        if isinstance(e, RequestEntityTooLarge):
            e = DemoError(f"upload is larger than the {config.max_upload_mb:g} MB limit; "
                          "take the photo at a lower resolution", 413, "too_large")
        elif isinstance(e, HTTPException):
            e = DemoError(e.description or e.name, e.code or 500, e.name.lower().replace(" ", "_"))
        elif not isinstance(e, DemoError):
            log.exception("unexpected error on %s %s", request.method, request.path)
            e = DemoError(f"internal error ({type(e).__name__}); nothing was changed, see the server log",
                          500, "internal")
        return jsonify(error=str(e), kind=e.kind), e.status

    return app


class _Api:
    """The /api/* endpoints over one classifier, scan log and data folder."""

    def __init__(self, classifier: sdk.Classifier, store: SQLScanStore, data: DataFolder, config: DemoConfig):
        self.classifier, self.store, self.data, self.config = classifier, store, data, config
        self.export_lock = threading.Lock()  # two exports at once would race on the temp folder name
        self.enroll_lock = threading.Lock()  # one enrollment at a time: each rewrites the file and the tree

    @property
    def tax(self) -> sdk.Taxonomy:
        return self.classifier.taxonomy  # the tree answers come from now: enrolling a product extends it

    def info(self):
        m, tax = self.classifier.manifest, self.tax
        return jsonify(model_sha256=m.sha256, target=m.target, precision=m.precision,
                       input_size=self.classifier.input_size, levels=list(tax.level_names),
                       taxonomy_hash=tax.hash, max_upload_mb=self.config.max_upload_mb)

    def taxonomy(self):
        tax = self.tax

        def node(level: int, index: int) -> dict[str, Any]:  # the label tree for the correction picker
            return {"name": tax.node(level, index).name, "level": level, "index": index,
                    "children": [node(level + 1, c) for c in tax.children(level, index)]}

        return jsonify(levels=list(tax.level_names), tree=[node(0, i) for i in range(tax.sizes[0])],
                       level_words=[level_word(n) for n in tax.level_names],
                       enrolled=[c.label for c in self.classifier.enrolled])

    def classify(self):
        f = request.files.get("image")
        if f is None:
            raise DemoError("no image in the upload (multipart field 'image')")
        photo = f.read()
        if not photo:
            raise DemoError("the uploaded image is empty; take the photo again", 400, "invalid_image")
        station, operator = station_and_operator(request.form)
        try:
            pred = self.classifier.classify(photo)
        except sdk.UnsupportedFormatError as e:
            raise DemoError(f"unsupported image format: {e}. Use a JPEG, PNG or WebP photo.", 415,
                            "unsupported_format") from None
        except sdk.InvalidImageError as e:
            raise DemoError(f"not a usable image: {e}", 400, "invalid_image") from None
        except sdk.ModelOutputError as e:
            raise DemoError(f"the model could not answer for this photo ({e}); try another photo", 422,
                            "model_output") from None
        sha = hashlib.sha256(photo).hexdigest()
        tax = pred.taxonomy  # the tree this answer is from, whatever enrollments happen meanwhile
        deepest = pred.deepest_confident
        scan = self.store.add_scan(Scan(
            image_sha256=sha, image_file=self.data.save_image(photo, sha),
            model_sha256=self.classifier.manifest.sha256, taxonomy_hash=tax.hash,
            station=station, operator=operator, predicted_path=PATH_SEP.join(p.label for p in pred.path),
            predicted_level=len(pred.path) - 1, confidence=deepest.probability if deepest else 0.0,
            is_unknown=bool(pred.is_unknown), confidences={p.level: p.probability for p in pred.full_path},
            prediction=pred.to_dict()))
        return jsonify(scan=scan.to_dict(prediction=False), prediction=pred.to_dict(),
                       display=describe(pred, tax)), 201

    def action(self, scan_id: str):
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise DemoError("expected a JSON object {action, label?, station, operator}")
        act = body.get("action")
        if act not in ACTIONS:
            raise DemoError(f"action must be one of {', '.join(ACTIONS)}")
        station, operator = station_and_operator(body)
        scan = self._get(scan_id)
        if act == "confirmed":
            if not scan.predicted_path:
                raise DemoError("nothing to confirm: the model gave no label; correct or reject instead")
            final, level = scan.predicted_path, scan.predicted_level
        elif act == "corrected":
            final, level = _validate_path(self.tax, body.get("label"))
        else:
            final, level = None, None
        scan = self.store.record_action(scan_id, act, final, level, station, operator)
        return jsonify(scan=scan.to_dict(prediction=False))

    def _get(self, scan_id: str) -> Scan:
        try:
            return self.store.get(scan_id)
        except ScanNotFoundError as e:
            raise DemoError(str(e), 404, "not_found") from None

    @staticmethod
    def _filter() -> ScanFilter:
        try:
            return ScanFilter(**{f.name: request.args.get(f.name) or None for f in fields(ScanFilter)})
        except ValueError as e:
            raise DemoError(str(e)) from None

    def list_scans(self):
        flt = self._filter()
        try:
            limit = min(max(int(request.args.get("limit", 50)), 1), 500)
            offset = max(int(request.args.get("offset", 0)), 0)
        except ValueError:
            raise DemoError("limit and offset must be integers") from None
        return jsonify(scans=[s.to_dict(prediction=False) for s in self.store.list(flt, limit, offset)],
                       total=self.store.count(flt))

    def get_scan(self, scan_id: str):
        return jsonify(scan=self._get(scan_id).to_dict(), actions=self.store.actions(scan_id))

    def scan_image(self, scan_id: str):
        path = self.data.resolve(self._get(scan_id).image_file)
        if not path.is_file():
            raise DemoError("the image file of this scan is missing from the data folder", 404, "not_found")
        return send_file(path, max_age=0)

    def export_csv(self):
        buf = io.StringIO()
        self.store.export_csv(buf, self._filter())
        return Response(buf.getvalue(), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=scans.csv"})

    def export_dataset(self):
        with self.export_lock:
            result = self.data.export_dataset(self.store, self.tax)
        return jsonify({**result.to_dict(), "relative": result.directory.relative_to(self.data.root).as_posix()})

    # New products, from a few photos under an existing parent: the SDK adds them (`enrolled.json` beside the
    # model) and the scan log records each event with its photos (kept in the data folder, for retraining).

    def list_enrollments(self):
        clf, base = self.classifier, self.classifier.base_taxonomy
        up = base.depth - 2
        return jsonify(can_enroll=clf.can_enroll, min_photos=MIN_PHOTOS, max_photos=MAX_PHOTOS,
                       parent_level=base.level_names[up], parents=[base.path(up, i) for i in range(base.sizes[up])],
                       enrolled=[{"label": c.label, "parent": c.parent, "n_photos": c.n_photos, "created": c.created}
                                 for c in clf.enrolled],
                       events=self.store.enrollment_events(50))

    def enroll(self):
        label = typed_text(request.form.get("label"), "product name", MAX_LABEL_LEN)
        parent = typed_text(request.form.get("parent"), "parent", MAX_LABEL_LEN)
        station, operator = station_and_operator(request.form)
        photos = [f.read() for f in request.files.getlist("photo")]
        if not MIN_PHOTOS <= len(photos) <= MAX_PHOTOS:
            raise DemoError(f"take {MIN_PHOTOS} to {MAX_PHOTOS} photos of the product (got {len(photos)})")
        if not self.classifier.can_enroll:
            raise DemoError("this model cannot enroll products: it lacks the embedding output or its statistics "
                            "(`python -m sdk embedding-stats`)", 409, "model_cannot_enroll")
        with self.enroll_lock:
            try:
                cls = self.classifier.enroll(label, parent, photos)
            except sdk.EmbeddingUnavailableError as e:
                raise DemoError(str(e), 409, "model_cannot_enroll") from None
            except sdk.EnrollmentError as e:
                raise DemoError(str(e), 400, "enrollment") from None
            except sdk.InvalidImageError as e:
                raise DemoError(f"not a usable photo: {e}; take it again", 400, "invalid_image") from None
            files = [self.data.save_image(p, hashlib.sha256(p).hexdigest()) for p in photos]
            event = self.store.record_enrollment(
                "enrolled", cls.label, cls.parent, self.classifier.manifest.sha256, files,
                {"n_photos": cls.n_photos, "calibration": cls.calibration}, station, operator)
        base = self.classifier.base_taxonomy  # a new leaf's ancestors are trained nodes
        path = [*base.path(base.depth - 2, base.index(base.depth - 2, cls.parent)), cls.label]
        return jsonify(path=path, event=event, calibration=cls.calibration), 201

    def forget(self, label: str):
        station, operator = station_and_operator(request.get_json(silent=True) or {})
        with self.enroll_lock:
            gone = next((c for c in self.classifier.enrolled if c.label == label), None)
            try:
                self.classifier.forget(label)
            except sdk.EnrollmentError as e:
                raise DemoError(str(e), 404, "not_found") from None
            event = self.store.record_enrollment("forgotten", label, gone.parent, self.classifier.manifest.sha256, [],
                                                 {}, station, operator)
        return jsonify(event=event)


class DemoServer:
    """The app served by werkzeug's threaded server, in a background thread (for tests, the load
    benchmark) or in the foreground (`serve_forever`). Port 0 picks a free port."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, ssl_context: Any = None):
        self._server = make_server(host, port, app, threaded=True, ssl_context=ssl_context)
        self.port = self._server.server_port
        self._thread: threading.Thread | None = None
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

    def start(self) -> "DemoServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> "DemoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def open_demo(model_dir: str | Path, data_dir: str | Path, db: str | Path = "scans.sqlite",
              token: str | None = None, max_upload_mb: float = 16.0,
              num_threads: int | None = None) -> tuple[Flask, SQLScanStore]:
    clf = load_classifier(model_dir, num_threads)
    data = DataFolder(data_dir)
    store = open_store(data, db)
    return create_app(clf, store, data, DemoConfig(token or None, max_upload_mb)), store
