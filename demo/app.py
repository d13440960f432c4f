"""The warehouse-scanner web app: a Flask app over `sdk.Classifier`, a `SQLScanStore` and a `DataFolder`.

Pages (`/`, `/scans`) are static shells; everything with data goes through `/api/*`, which requires the
shared token when one is configured (header `Authorization: Bearer <token>`). Every error answers JSON
`{"error": "...", "kind": "..."}` with a status code; no input can take the server down.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Request, Response, jsonify, request, send_file, send_from_directory
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import make_server

import sdk

from .datafolder import DataFolder
from .enroll import EnrollApi
from .errors import DemoError, station_and_operator
from .storage import ACTIONS, PATH_SEP, Scan, ScanFilter, ScanNotFoundError, SQLiteScanStore, SQLScanStore

log = logging.getLogger("demo")
STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MODEL = Path(__file__).resolve().parent / "model"

# What the page says for "the next level is uncertain" ("Apple — variety uncertain").
LEVEL_WORDS = {"category": "category", "coarse": "type", "fine": "variety"}


class ModelMissingError(sdk.ModelNotFoundError):
    """The bundled model (or the --model folder) is not there."""


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
    """The SQLite scan log; a relative `db` lives in the data folder."""
    db = Path(db)
    return SQLiteScanStore(db if db.is_absolute() else data.resolve(db))


@dataclass(frozen=True)
class DemoConfig:
    token: str | None = None
    max_upload_mb: float = 16.0


def level_word(level_name: str) -> str:
    return LEVEL_WORDS.get(level_name, level_name)


def taxonomy_tree(tax: sdk.Taxonomy) -> list[dict[str, Any]]:
    """The label tree as nested JSON for the correction picker."""
    def node(level: int, index: int) -> dict[str, Any]:
        return {"name": tax.node(level, index).name, "level": level, "index": index,
                "children": [node(level + 1, c) for c in tax.children(level, index)]}
    return [node(0, i) for i in range(tax.sizes[0])]


def describe(pred: sdk.HierarchicalPrediction, tax: sdk.Taxonomy) -> dict[str, Any]:
    """What the page shows: a headline that says plainly how far the model is sure, the breadcrumb, and
    quick-pick candidates for the level it stopped before."""
    path, depth = list(pred.path), tax.depth
    if pred.is_unknown:
        status, headline, next_level = "unknown", "Unknown item — not in the catalogue", 0
    elif not path:
        status, headline, next_level = "uncertain", "Not sure what this is", 0
    elif len(path) < depth:
        next_level = len(path)
        status, headline = "backoff", f"{path[-1].label} — {level_word(tax.level_names[next_level])} uncertain"
    else:
        status, headline, next_level = "complete", path[-1].label, depth - 1
    # Candidates: finest-level guesses under the last sure node, best first (what a tap would pick).
    fine = depth - 1
    prefix = [p.label for p in path] if status in ("backoff", "complete") else []
    cands = []
    for label, prob in pred.top_k.get(tax.level_names[fine], ()):
        names = tax.path(fine, tax.index(fine, label))
        if names[:len(prefix)] == prefix:
            cands.append({"path": names, "probability": prob})
    crumbs = [{"label": p.label, "level": p.level, "probability": p.probability} for p in pred.full_path]
    return {"status": status, "headline": headline, "crumbs": crumbs[:len(path)], "full_path": crumbs,
            "next_level": tax.level_names[next_level], "next_level_word": level_word(tax.level_names[next_level]),
            "candidates": cands[:4], "can_confirm": bool(path) and not pred.is_unknown}


def _validate_path(tax: sdk.Taxonomy, names: Any) -> tuple[str, int]:
    """A root-to-node list of label names from the picker -> (joined path, level). Raises DemoError."""
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
    _guard(app, config)
    app.add_url_rule("/", "index", lambda: send_from_directory(STATIC, "index.html"))
    app.add_url_rule("/scans", "scans_page", lambda: send_from_directory(STATIC, "scans.html"))
    _ScanApi(classifier, store, data, config).register(app)
    EnrollApi(classifier, store, data).register(app)
    return app


def _guard(app: Flask, config: DemoConfig) -> None:
    """The shared token, security headers, and errors that always answer JSON and never crash."""

    @app.before_request
    def check_token() -> Any:
        if config.token and request.path.startswith("/api/"):
            auth = request.headers.get("Authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("X-Token", "")
            if not hmac.compare_digest(given.encode(), config.token.encode()):
                raise DemoError("this server needs the shared token: enter it in Settings", 401, "unauthorized")
        return None

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; style-src 'self'")
        resp.headers["Referrer-Policy"] = "no-referrer"
        if request.path.startswith("/api/"):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.errorhandler(DemoError)
    def demo_error(e: DemoError):
        return jsonify(error=str(e), kind=e.kind), e.status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e):
        return jsonify(error=f"upload is larger than the {config.max_upload_mb:g} MB limit; "
                             "take the photo at a lower resolution", kind="too_large"), 413

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=e.description or e.name, kind=e.name.lower().replace(" ", "_")), e.code or 500

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error ({type(e).__name__}); nothing was changed, see the server log",
                       kind="internal"), 500


class _ScanApi:
    """The /api/* endpoints over one classifier, scan log and data folder."""

    def __init__(self, classifier: sdk.Classifier, store: SQLScanStore, data: DataFolder, config: DemoConfig):
        self.classifier, self.store, self.data, self.config = classifier, store, data, config
        self.export_lock = threading.Lock()  # two exports at once would race on the temp folder name

    @property
    def tax(self) -> sdk.Taxonomy:
        """The tree answers come from now: enrolling a product (EnrollApi) extends it."""
        return self.classifier.taxonomy

    def register(self, app: Flask) -> None:
        for rule, method, view in (
            ("/api/info", "GET", self.info), ("/api/taxonomy", "GET", self.taxonomy),
            ("/api/scans", "POST", self.classify), ("/api/scans/<scan_id>/action", "POST", self.action),
            ("/api/scans", "GET", self.list_scans), ("/api/scans/<scan_id>", "GET", self.get_scan),
            ("/api/scans/<scan_id>/image", "GET", self.scan_image), ("/api/export.csv", "GET", self.export_csv),
            ("/api/export/dataset", "POST", self.export_dataset),
        ):
            app.add_url_rule(rule, view.__name__, view, methods=[method])

    def info(self):
        m, tax = self.classifier.manifest, self.tax
        return jsonify(model_sha256=m.sha256, target=m.target, precision=m.precision,
                       input_size=self.classifier.input_size, levels=list(tax.level_names),
                       taxonomy_hash=tax.hash, max_upload_mb=self.config.max_upload_mb)

    def taxonomy(self):
        names = self.tax.level_names
        return jsonify(levels=list(names), tree=taxonomy_tree(self.tax), level_words=[level_word(n) for n in names],
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
        return jsonify(scan=_public(scan), prediction=pred.to_dict(), display=describe(pred, tax)), 201

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
        return jsonify(scan=_public(self.store.record_action(scan_id, act, final, level, station, operator)))

    def _get(self, scan_id: str) -> Scan:
        try:
            return self.store.get(scan_id)
        except ScanNotFoundError as e:
            raise DemoError(str(e), 404, "not_found") from None

    @staticmethod
    def _filter() -> ScanFilter:
        given = {k: request.args.get(k) or None for k in ("action", "station", "operator", "label", "since", "until")}
        if given["action"] and given["action"] not in ACTIONS + ("pending",):
            raise DemoError(f"action filter must be one of {', '.join(ACTIONS + ('pending',))}")
        return ScanFilter(**given)

    def list_scans(self):
        flt = self._filter()
        try:
            limit = min(max(int(request.args.get("limit", 50)), 1), 500)
            offset = max(int(request.args.get("offset", 0)), 0)
        except ValueError:
            raise DemoError("limit and offset must be integers") from None
        return jsonify(scans=[_public(s) for s in self.store.list(flt, limit, offset)], total=self.store.count(flt))

    def get_scan(self, scan_id: str):
        scan = self._get(scan_id)
        actions = self.store.actions(scan_id)
        return jsonify(scan=_public(scan, full=True), actions=actions)

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


def _public(scan: Scan, full: bool = False) -> dict[str, Any]:
    d = scan.to_dict()
    if not full:
        d.pop("prediction")
    return d


class DemoServer:
    """The app served by werkzeug's threaded server, in a background thread (for tests, the load
    benchmark) or in the foreground (`serve_forever`). Port 0 picks a free port."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, ssl_context: Any = None):
        self._server = make_server(host, port, app, threaded=True, ssl_context=ssl_context)
        self.host, self.port = host, self._server.server_port
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
    """Load model, open the data folder and the SQLite log (a relative `db` lives in the data folder)."""
    clf = load_classifier(model_dir, num_threads)
    data = DataFolder(data_dir)
    store = open_store(data, db)
    return create_app(clf, store, data, DemoConfig(token or None, max_upload_mb)), store
