"""The demo's data folder: scanned images (content-addressed) and labelled-dataset exports. Every file the
server writes goes through `DataFolder.resolve`, which refuses paths outside the folder, so no request can
make the server write elsewhere."""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from sdk import Taxonomy, atomic_write

from .storage import PATH_SEP, ScanFilter, SQLScanStore

# (offset, magic bytes, file extension): the SDK has already decoded the bytes and checked the format
# against its allowlist; this only names the file.
_MAGIC = ((0, b"\xff\xd8\xff", ".jpg"), (0, b"\x89PNG\r\n\x1a\n", ".png"), (0, b"GIF87a", ".gif"),
          (0, b"GIF89a", ".gif"), (0, b"BM", ".bmp"), (0, b"II*\x00", ".tif"), (0, b"MM\x00*", ".tif"),
          (8, b"WEBP", ".webp"))


class OutsideDataFolderError(ValueError):
    """A path would land outside the data folder."""


@dataclass(frozen=True)
class DatasetExport:
    directory: Path
    split_file: Path
    count: int
    skipped: int  # confirmed/corrected scans that are not at the fine level or not in this taxonomy

    def to_dict(self) -> dict:
        return {**asdict(self), "directory": str(self.directory), "split_file": str(self.split_file)}


class DataFolder:
    """Root folder of everything the demo writes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, relative: str | os.PathLike) -> Path:
        """The absolute path of `relative` inside the folder; raises if it would escape it."""
        p = (self.root / relative).resolve()
        if p != self.root and self.root not in p.parents:
            raise OutsideDataFolderError(f"{relative!s} resolves to {p}, outside the data folder {self.root}")
        return p

    def save_image(self, data: bytes, sha256: str) -> str:
        """Store the uploaded bytes under images/<sha[:2]>/<sha><ext>; returns the relative path.
        Content-addressed, so a rescan of the same photo writes nothing new."""
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        suffix = next((ext for at, magic, ext in _MAGIC if data.startswith(magic, at)), ".img")
        rel = f"images/{sha256[:2]}/{sha256}{suffix}"
        dest = self.resolve(rel)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, data)
        return rel

    def export_dataset(self, store: SQLScanStore, taxonomy: Taxonomy, name: str | None = None) -> DatasetExport:
        """Write confirmed and corrected scans as a Grocery-style dataset under exports/<name>/: `train.txt`
        (lines `train/<Category>/<Coarse>/<Fine>/<sha>.jpg, fine_id, coarse_id`, ids being the taxonomy's
        level indices, which for Grocery are its own class ids), the images, `taxonomy.json` and, for a
        three-level tree, `classes.csv`, so `sdk.load_dataset(<dir>, "train")` reads it like the original.
        Scans not labelled down to the finest level are skipped; a photo keeps its latest label."""
        name = name or "dataset-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"export name must be letters, digits, - and _; got {name!r}")
        out = self.resolve(f"exports/{name}")
        if out.exists():
            raise FileExistsError(f"{out} already exists; choose another name")
        fine = taxonomy.depth - 1
        scans = (s for action in ("confirmed", "corrected") for s in store.iter_all(ScanFilter(action=action)))
        # (action time, image sha, image file, fine index or None), oldest action first
        labelled = sorted(((s.action_at or "", s.image_sha256, s.image_file, _leaf_index(taxonomy, s.final_path))
                           for s in scans), key=lambda t: t[0])
        latest = {sha: (image_file, leaf) for _, sha, image_file, leaf in labelled if leaf is not None}
        tmp = self.resolve(f"exports/.tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
        tmp.mkdir(parents=True)
        lines = []
        for sha, (image_file, leaf) in sorted(latest.items(), key=lambda kv: (kv[1][1], kv[0])):
            src = self.resolve(image_file)
            rel = "/".join(["train", *map(_safe_part, taxonomy.path(fine, leaf)), sha + src.suffix])
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dest)   # images are immutable (content-addressed): a hard link is a copy
            except OSError:
                shutil.copyfile(src, dest)
            coarse = taxonomy.ancestors(fine, leaf)[-2] if taxonomy.depth >= 2 else leaf
            lines.append(f"{rel}, {leaf}, {coarse}")
        (tmp / "train.txt").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
        taxonomy.save(tmp / "taxonomy.json")
        if taxonomy.depth == 3:
            _write_grocery_classes(taxonomy, tmp / "classes.csv")
        os.replace(tmp, out)
        return DatasetExport(out, out / "train.txt", len(lines), skipped=sum(t[3] is None for t in labelled))


def _safe_part(name: str) -> str:
    # Label names become folder names; keep them one path component.
    cleaned = "".join(c if c.isalnum() or c in "-_ ." else "_" for c in name).strip(" .")
    return cleaned or "_"


def _leaf_index(taxonomy: Taxonomy, path: str | None) -> int | None:
    """Fine-level index of a `PATH_SEP`-joined root-to-leaf path, or None if it is not one."""
    names, fine = (path or "").split(PATH_SEP), taxonomy.depth - 1
    if len(names) != taxonomy.depth or names[-1] not in taxonomy.names(fine):
        return None
    leaf = taxonomy.index(fine, names[-1])
    return leaf if taxonomy.path(fine, leaf) == names else None


def _write_grocery_classes(taxonomy: Taxonomy, path: Path) -> None:
    """classes.csv in the Grocery Store layout; the category is read from the iconic-image path."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Class Name (str)", "Class ID (int)", "Coarse Class Name (str)", "Coarse Class ID (int)",
                    "Iconic Image Path (str)", "Product Description Path (str)"])
        for leaf, fine_name in enumerate(taxonomy.names(2)):
            cat, coarse, _ = taxonomy.ancestors(2, leaf)
            cat_name, coarse_name = taxonomy.node(0, cat).name, taxonomy.node(1, coarse).name
            base = f"/iconic-images-and-descriptions/{cat_name}/{coarse_name}/{fine_name}/{fine_name}"
            w.writerow([fine_name, leaf, coarse_name, coarse, base + "_Iconic.jpg", base + "_Description.txt"])
