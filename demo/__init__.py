"""Warehouse-scanner demo: a LAN web app over the SDK with a scan log that loses nothing.

`python -m demo` serves it; `create_app` / `open_demo` build it in code; `SQLiteScanStore` is the
embedded scan log (`SQLScanStore` takes any DB-API 2 database).
"""

from .app import DemoConfig, DemoServer, create_app, describe, load_classifier, open_demo
from .datafolder import DataFolder, DatasetExport
from .storage import Scan, ScanFilter, SQLiteScanStore, SQLScanStore

__all__ = ["DemoConfig", "DemoServer", "create_app", "describe", "load_classifier", "open_demo",
           "DataFolder", "DatasetExport", "Scan", "ScanFilter", "SQLiteScanStore", "SQLScanStore"]
