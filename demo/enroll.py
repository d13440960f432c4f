"""The "new product" flow: enroll a product from a few photos under an existing parent, on the station.

Reached from the scan page's Correct… picker: the operator takes `MIN_PHOTOS` photos, names the product
and picks its parent; the SDK adds it (`sdk.Classifier.enroll`, written to `enrolled.json` beside the
model) and the scan log records the event with its photos (kept in the data folder, for retraining later).
"""

from __future__ import annotations

import hashlib
import threading

from flask import Flask, jsonify, request

import sdk

from .datafolder import DataFolder
from .errors import DemoError, station_and_operator, typed_text
from .storage import SQLScanStore

MIN_PHOTOS = 5  # what the page asks for: fewer photos make a noticeably weaker prototype (research/enrollment.py)
MAX_PHOTOS = 10
MAX_LABEL_LEN = 120


class EnrollApi:
    """/api/enrollments: list, add (multipart photos + label + parent), forget."""

    def __init__(self, classifier: sdk.Classifier, store: SQLScanStore, data: DataFolder):
        self.classifier, self.store, self.data = classifier, store, data
        self.lock = threading.Lock()  # one enrollment at a time: each rewrites the file and the tree

    def register(self, app: Flask) -> None:
        app.add_url_rule("/api/enrollments", "list_enrollments", self.list, methods=["GET"])
        app.add_url_rule("/api/enrollments", "enroll", self.enroll, methods=["POST"])
        app.add_url_rule("/api/enrollments/<label>/forget", "forget", self.forget, methods=["POST"])

    def list(self):
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
        with self.lock:
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
        body = request.get_json(silent=True) or {}
        station, operator = station_and_operator(body)
        with self.lock:
            gone = next((c for c in self.classifier.enrolled if c.label == label), None)
            try:
                self.classifier.forget(label)
            except sdk.EnrollmentError as e:
                raise DemoError(str(e), 404, "not_found") from None
            event = self.store.record_enrollment("forgotten", label, gone.parent, self.classifier.manifest.sha256, [],
                                                 {}, station, operator)
        return jsonify(event=event)

