"""The scan log: every scan and every operator action, committed in a transaction each.

`SQLScanStore` keeps it over any DB-API 2 connection, in SQL that SQLite, PostgreSQL and MySQL all accept
(text ids made in Python, ISO-8601 UTC timestamps as text, no upserts, no RETURNING); `SQLiteScanStore`
is the embedded default.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sqlite3
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

ACTIONS = ("confirmed", "corrected", "rejected")
FILTER_ACTIONS = ACTIONS + ("pending",)  # "pending": no action yet
ENROLLMENT_EVENTS = ("enrolled", "forgotten")
PATH_SEP = " > "

# Each table's column definitions, in storage order.
SCAN_TABLE = (
    "id VARCHAR(36) PRIMARY KEY, created_at VARCHAR(32) NOT NULL, image_sha256 CHAR(64) NOT NULL, "
    "image_file VARCHAR(255) NOT NULL, model_sha256 CHAR(64) NOT NULL, taxonomy_hash CHAR(64) NOT NULL, "
    "station VARCHAR(64) NOT NULL, operator VARCHAR(64) NOT NULL, predicted_path VARCHAR(1024) NOT NULL, "
    "predicted_level INTEGER NOT NULL, confidence DOUBLE PRECISION NOT NULL, is_unknown INTEGER NOT NULL, "
    "confidences TEXT NOT NULL, prediction TEXT NOT NULL, action VARCHAR(16), final_path VARCHAR(1024), "
    "final_level INTEGER, action_at VARCHAR(32), action_operator VARCHAR(64), action_station VARCHAR(64)")
# The audit trail: a scan may be confirmed, then corrected; `scans` holds the latest action, `scan_actions` all.
ACTION_TABLE = (
    "id VARCHAR(36) PRIMARY KEY, scan_id VARCHAR(36) NOT NULL REFERENCES scans (id), created_at VARCHAR(32) NOT NULL, "
    "action VARCHAR(16) NOT NULL, final_path VARCHAR(1024), final_level INTEGER, station VARCHAR(64) NOT NULL, "
    "operator VARCHAR(64) NOT NULL")
# Products enrolled on this station and forgotten again: who, when, from which photos, for which model.
EVENT_TABLE = (
    "id VARCHAR(36) PRIMARY KEY, created_at VARCHAR(32) NOT NULL, event VARCHAR(16) NOT NULL, "
    "label VARCHAR(255) NOT NULL, parent VARCHAR(255) NOT NULL, model_sha256 CHAR(64) NOT NULL, "
    "photos TEXT NOT NULL, details TEXT NOT NULL, station VARCHAR(64) NOT NULL, operator VARCHAR(64) NOT NULL")
COLUMNS, ACTION_COLUMNS, EVENT_COLUMNS = (tuple(c.split()[0] for c in t.split(", "))
                                          for t in (SCAN_TABLE, ACTION_TABLE, EVENT_TABLE))
# One statement per string: DB-API drivers other than sqlite3 do not accept scripts.
SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS scans ({SCAN_TABLE})",
    "CREATE INDEX IF NOT EXISTS scans_created ON scans (created_at)",
    "CREATE INDEX IF NOT EXISTS scans_action ON scans (action)",
    f"CREATE TABLE IF NOT EXISTS scan_actions ({ACTION_TABLE})",
    "CREATE INDEX IF NOT EXISTS scan_actions_scan ON scan_actions (scan_id)",
    f"CREATE TABLE IF NOT EXISTS enrollment_events ({EVENT_TABLE})",
)


class ScanNotFoundError(KeyError):
    def __str__(self) -> str:
        return f"no scan with id {self.args[0]!r}"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Scan:
    """One row of the scan log. Paths are root-to-node label names joined by `PATH_SEP`."""

    image_sha256: str
    image_file: str              # relative to the data folder
    model_sha256: str
    taxonomy_hash: str
    station: str
    operator: str
    predicted_path: str          # after back-off ('' when even the root level is unsure or unknown)
    predicted_level: int         # depth of predicted_path minus one (-1 when empty)
    confidence: float            # marginal of the deepest predicted node (0 when empty)
    is_unknown: bool
    confidences: dict[str, float]  # level name -> marginal along the full path
    prediction: dict[str, Any]     # HierarchicalPrediction.to_dict()
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: str = field(default_factory=utcnow)
    action: str | None = None
    final_path: str | None = None
    final_level: int | None = None
    action_at: str | None = None
    action_operator: str | None = None
    action_station: str | None = None

    def to_dict(self, prediction: bool = True) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if prediction or k != "prediction"}

    def _row(self) -> tuple:
        d = {**asdict(self), "is_unknown": int(self.is_unknown),
             "confidences": json.dumps(self.confidences, ensure_ascii=False),
             "prediction": json.dumps(self.prediction, ensure_ascii=False)}
        return tuple(d[c] for c in COLUMNS)

    @classmethod
    def _from_row(cls, row: Sequence[Any]) -> "Scan":
        d = dict(zip(COLUMNS, row))
        return cls(**{**d, "is_unknown": bool(d["is_unknown"]), "confidences": json.loads(d["confidences"]),
                      "prediction": json.loads(d["prediction"])})


@dataclass(frozen=True)
class ScanFilter:
    """Filters of the recent-scans page; None means any."""

    action: str | None = None      # one of FILTER_ACTIONS
    station: str | None = None
    operator: str | None = None
    label: str | None = None       # substring of the predicted or final path
    since: str | None = None       # ISO timestamp, inclusive
    until: str | None = None       # ISO timestamp, exclusive

    def __post_init__(self) -> None:
        if self.action and self.action not in FILTER_ACTIONS:
            raise ValueError(f"action filter must be one of {', '.join(FILTER_ACTIONS)}")


def _csv_safe(v: Any) -> Any:
    # Operator and station ids are typed by people; a leading = + - @ would run as a formula when the
    # CSV is opened in a spreadsheet.
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return "" if v is None else v


class SQLScanStore:
    """The scan log over a DB-API 2 connection; every method is one transaction. `placeholder` is the
    driver's parameter marker ('?' for sqlite3, '%s' for psycopg / mysqlclient)."""

    def __init__(self, connect: Callable[[], Any], placeholder: str = "?"):
        self._conn = connect()
        self._ph = placeholder
        # One connection shared by the server's threads; statements are short, so a lock is cheaper
        # than a pool and keeps every transaction serial.
        self._lock = threading.Lock()
        with self._tx() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)

    def _sql(self, sql: str) -> str:
        return sql if self._ph == "?" else sql.replace("?", self._ph)

    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Sequence[Any]]:
        with self._tx() as cur:
            cur.execute(self._sql(sql), args)
            return cur.fetchall()

    def _insert(self, cur: Any, table: str, columns: Sequence[str], row: Sequence[Any]) -> None:
        marks = ", ".join("?" * len(columns))
        cur.execute(self._sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"), row)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            cur = self._conn.cursor()
            try:
                yield cur
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise
            finally:
                cur.close()

    def add_scan(self, scan: Scan) -> Scan:
        with self._tx() as cur:
            self._insert(cur, "scans", COLUMNS, scan._row())
        return scan

    def record_action(self, scan_id: str, action: str, final_path: str | None, final_level: int | None,
                      station: str, operator: str) -> Scan:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}; got {action!r}")
        now = utcnow()
        with self._tx() as cur:
            cur.execute(self._sql(
                "UPDATE scans SET action = ?, final_path = ?, final_level = ?, action_at = ?, "
                "action_operator = ?, action_station = ? WHERE id = ?"),
                (action, final_path, final_level, now, operator, station, scan_id))
            if cur.rowcount == 0:
                raise ScanNotFoundError(scan_id)
            self._insert(cur, "scan_actions", ACTION_COLUMNS,
                         (str(uuid.uuid4()), scan_id, now, action, final_path, final_level, station, operator))
        return self.get(scan_id)

    def get(self, scan_id: str) -> Scan:
        rows = self._fetch(f"SELECT {', '.join(COLUMNS)} FROM scans WHERE id = ?", (scan_id,))
        if not rows:
            raise ScanNotFoundError(scan_id)
        return Scan._from_row(rows[0])

    def actions(self, scan_id: str) -> list[dict[str, Any]]:
        cols = ("created_at", "action", "final_path", "final_level", "station", "operator")
        rows = self._fetch(f"SELECT {', '.join(cols)} FROM scan_actions WHERE scan_id = ? ORDER BY created_at, id",
                           (scan_id,))
        return [dict(zip(cols, r)) for r in rows]

    def _where(self, flt: ScanFilter) -> tuple[str, list[Any]]:
        terms = ["action IS NULL"] if flt.action == "pending" else []
        args: list[Any] = []
        for term, value in (("action = ?", flt.action != "pending" and flt.action), ("station = ?", flt.station),
                            ("operator = ?", flt.operator), ("created_at >= ?", flt.since),
                            ("created_at < ?", flt.until)):
            if value:
                terms.append(term)
                args.append(value)
        if flt.label:
            # LIKE with explicit ESCAPE behaves the same on SQLite, PostgreSQL and MySQL.
            pat = "%" + flt.label.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            terms.append("(predicted_path LIKE ? ESCAPE '\\' OR final_path LIKE ? ESCAPE '\\')")
            args += [pat, pat]
        return (" WHERE " + " AND ".join(terms)) if terms else "", args

    def list(self, flt: ScanFilter = ScanFilter(), limit: int = 100, offset: int = 0,
             oldest_first: bool = False) -> list[Scan]:
        where, args = self._where(flt)
        order = "ASC" if oldest_first else "DESC"
        sql = (f"SELECT {', '.join(COLUMNS)} FROM scans{where} ORDER BY created_at {order}, id {order} "
               f"LIMIT {int(limit)} OFFSET {int(offset)}")
        return [Scan._from_row(r) for r in self._fetch(sql, args)]

    def count(self, flt: ScanFilter = ScanFilter()) -> int:
        where, args = self._where(flt)
        return int(self._fetch(f"SELECT COUNT(*) FROM scans{where}", args)[0][0])

    def record_enrollment(self, event: str, label: str, parent: str, model_sha256: str, photos: list[str],
                          details: dict[str, Any], station: str, operator: str) -> dict[str, Any]:
        """Log a product enrolled or forgotten (`photos`: their files in the data folder)."""
        if event not in ENROLLMENT_EVENTS:
            raise ValueError(f"event must be one of {ENROLLMENT_EVENTS}; got {event!r}")
        row = (str(uuid.uuid4()), utcnow(), event, label, parent, model_sha256, json.dumps(photos),
               json.dumps(details, ensure_ascii=False), station, operator)
        with self._tx() as cur:
            self._insert(cur, "enrollment_events", EVENT_COLUMNS, row)
        return _event(row)

    def enrollment_events(self, limit: int = 100) -> list[dict[str, Any]]:
        return [_event(r) for r in self._fetch(f"SELECT {', '.join(EVENT_COLUMNS)} FROM enrollment_events "
                                               f"ORDER BY created_at DESC, id DESC LIMIT {int(limit)}")]

    def iter_all(self, flt: ScanFilter = ScanFilter(), page: int = 500) -> Iterator[Scan]:
        """Every matching scan, oldest first, read `page` rows at a time (bounded memory for exports)."""
        offset = 0
        while True:
            rows = self.list(flt, limit=page, offset=offset, oldest_first=True)
            yield from rows
            if len(rows) < page:
                return
            offset += page

    def export_csv(self, out: io.TextIOBase, flt: ScanFilter = ScanFilter()) -> None:
        """Write matching scans as CSV, one row each (the prediction JSON in a column)."""
        w = csv.writer(out)
        w.writerow(COLUMNS)
        w.writerows([_csv_safe(v) for v in s._row()] for s in self.iter_all(flt))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _event(row: Sequence[Any]) -> dict[str, Any]:
    d = dict(zip(EVENT_COLUMNS, row))
    d["photos"], d["details"] = json.loads(d["photos"]), json.loads(d["details"])
    return d


class SQLiteScanStore(SQLScanStore):
    """The embedded default: one SQLite file, WAL journal, synchronous=FULL so a committed scan
    survives a crash or power loss."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
                conn.execute(f"PRAGMA {pragma}")
            return conn

        super().__init__(connect, "?")
