"""The one label tree every stage reads (see ARCHITECTURE.md, "Taxonomy").

Levels are ordered coarse to fine. The index of a node within its level is the output index of that
level's head. Every leaf sits at the deepest level.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ._errors import TaxonomyError
from ._files import atomic_write, json_sha256

FORMAT = "hierfg.taxonomy/1"


@dataclass(frozen=True)
class Node:
    name: str
    parent: int | None  # index in the level above; None only at level 0


class Taxonomy:
    """A frozen, validated label tree: `Taxonomy(["kind", "item"], [[Node("Fruit", None)], [Node("Apple", 0)]])`."""

    def __init__(self, level_names: Sequence[str], levels: Sequence[Sequence[Node]]):
        self._level_names = tuple(str(n) for n in level_names)
        self._levels = tuple(tuple(Node(str(n.name), n.parent) for n in lvl) for lvl in levels)
        self._validate()
        self._index = [{n.name: i for i, n in enumerate(lvl)} for lvl in self._levels]
        # children[l][i]: indices at level l+1 whose parent is node i of level l
        self._children = [[[j for j, n in enumerate(lower) if n.parent == i] for i in range(len(upper))]
                          for upper, lower in zip(self._levels, self._levels[1:])]
        self._hash = json_sha256(self._payload())

    def _validate(self) -> None:
        names, levels = self._level_names, self._levels
        if not names or len(levels) != len(names):
            raise TaxonomyError(f"taxonomy needs one node list per level name; got {len(names)} names "
                                f"and {len(levels)} levels")
        if len(set(names)) != len(names):
            raise TaxonomyError(f"duplicate level names in {names}")
        for lvl, nodes in enumerate(levels):
            if not nodes:
                raise TaxonomyError(f"level {lvl} ({names[lvl]!r}) has no nodes")
            seen: set[str] = set()
            for i, node in enumerate(nodes):
                if not node.name:
                    raise TaxonomyError(f"level {lvl} node {i} has an empty name")
                if node.name in seen:
                    raise TaxonomyError(f"duplicate name {node.name!r} at level {lvl} ({names[lvl]!r}); "
                                        "names must be unique within a level")
                seen.add(node.name)
                p = node.parent
                if lvl == 0 and p is not None:
                    raise TaxonomyError(f"root-level node {node.name!r} must have parent null")
                if lvl and (not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < len(levels[lvl - 1])):
                    raise TaxonomyError(f"orphan: node {node.name!r} at level {lvl} has parent {p!r}, which is not "
                                        f"an index into level {lvl - 1} (0..{len(levels[lvl - 1]) - 1})")
        # Parents always point one level up, so a cycle cannot be expressed; what can go wrong is a
        # node above the deepest level with no child: a leaf that is not at the deepest level.
        for lvl, (upper, lower) in enumerate(zip(levels, levels[1:])):
            childless = set(range(len(upper))) - {n.parent for n in lower}
            if childless:
                raise TaxonomyError(
                    f"node {upper[min(childless)].name!r} at level {lvl} has no child: every leaf must sit at the "
                    f"deepest level ({names[-1]!r}); repeat it one level down (as Banana > Banana)")

    @property
    def depth(self) -> int:
        return len(self._levels)

    @property
    def level_names(self) -> tuple[str, ...]:
        return self._level_names

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(l) for l in self._levels)

    @property
    def hash(self) -> str:
        return self._hash

    def names(self, level: int) -> list[str]:
        return [n.name for n in self._levels[level]]

    def node(self, level: int, index: int) -> Node:
        return self._levels[level][index]

    def index(self, level: int, name: str) -> int:
        try:
            return self._index[level][name]
        except KeyError:
            raise TaxonomyError(f"no node named {name!r} at level {level} ({self._level_names[level]!r})") from None

    def find(self, name: str) -> tuple[int, int]:
        """(level, index) of the node `level:name`, or of the shallowest node called `name`."""
        level, sep, rest = name.partition(":")
        if sep and level in self._level_names:
            lvl = self._level_names.index(level)
            return lvl, self.index(lvl, rest)
        for lvl in range(self.depth):
            if name in self._index[lvl]:
                return lvl, self._index[lvl][name]
        raise TaxonomyError(f"no node named {name!r} in the taxonomy")

    def parent(self, level: int, index: int) -> int | None:
        return self._levels[level][index].parent

    def children(self, level: int, index: int) -> list[int]:
        return list(self._children[level][index]) if level < self.depth - 1 else []

    def ancestors(self, level: int, index: int) -> list[int]:
        """Indices of the node's ancestors at levels 0..level (the node itself last)."""
        out = [index]
        for lvl in range(level, 0, -1):
            out.append(self._levels[lvl][out[-1]].parent)
        return out[::-1]

    def path(self, level: int, index: int) -> list[str]:
        return [self._levels[l][i].name for l, i in enumerate(self.ancestors(level, index))]

    def ancestor_matrix(self) -> list[list[int]]:
        """For each leaf (deepest-level index), its ancestor index at every level."""
        last = self.depth - 1
        return [self.ancestors(last, i) for i in range(len(self._levels[last]))]

    def parent_index(self, level: int) -> list[int]:
        """Parent indices of every node at `level` (>= 1)."""
        return [n.parent for n in self._levels[level]]

    def _payload(self) -> dict:
        return {"levels": [{"name": name, "nodes": [{"name": n.name, "parent": n.parent} for n in nodes]}
                           for name, nodes in zip(self._level_names, self._levels)]}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "hash": self._hash, **self._payload()}

    @classmethod
    def from_dict(cls, data: dict) -> "Taxonomy":
        if not isinstance(data, dict) or not isinstance(data.get("levels"), list):
            raise TaxonomyError("taxonomy JSON must be an object with a 'levels' list")
        if data.get("format", FORMAT) != FORMAT:
            raise TaxonomyError(f"unsupported taxonomy format {data.get('format')!r}; expected {FORMAT!r}")
        try:
            names = [lvl["name"] for lvl in data["levels"]]
            levels = [[Node(n["name"], n.get("parent")) for n in lvl["nodes"]] for lvl in data["levels"]]
        except (KeyError, TypeError) as e:
            raise TaxonomyError(f"taxonomy JSON is missing a field: {e}") from None
        tax = cls(names, levels)
        if "hash" in data and data["hash"] != tax.hash:
            raise TaxonomyError(f"taxonomy hash mismatch: file says {data['hash'][:12]}…, content hashes to "
                                f"{tax.hash[:12]}…")
        return tax

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Taxonomy":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TaxonomyError(f"{path}: not valid taxonomy JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_paths(cls, level_names: Sequence[str], paths: Iterable[Sequence[str]]) -> "Taxonomy":
        """Build from root-to-leaf name paths, all of length len(level_names). Order: first seen."""
        depth = len(level_names)
        levels: list[list[Node]] = [[] for _ in range(depth)]
        index: list[dict[tuple[int | None, str], int]] = [{} for _ in range(depth)]
        for path in paths:
            if len(path) != depth:
                raise TaxonomyError(f"path {list(path)} has {len(path)} parts; expected {depth} ({list(level_names)})")
            parent: int | None = None
            for lvl, name in enumerate(path):
                key = (parent, name)
                if key not in index[lvl]:
                    index[lvl][key] = len(levels[lvl])
                    levels[lvl].append(Node(name, parent))
                parent = index[lvl][key]
        return cls(level_names, levels)

    @classmethod
    def from_grocery(cls, root: str | os.PathLike) -> "Taxonomy":
        """Grocery Store: category (first folder under the split) > coarse > fine, indexed by classes.csv's own
        class ids, so labels in the split files map straight to head outputs."""
        csv_path = Path(root) / "classes.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"{csv_path} not found: is {root} a Grocery Store dataset root?")
        with open(csv_path, newline="", encoding="utf-8") as f:
            # (fine id, fine, coarse id, coarse, category from iconic-images-and-descriptions/<Category>/...)
            rows = sorted((int(r[1]), r[0].strip(), int(r[3]), r[2].strip(), Path(r[4].strip("/")).parts[1])
                          for r in list(csv.reader(f))[1:] if r)
        categories = list(dict.fromkeys(cat for *_, cat in rows))  # in order of first appearance
        coarse_nodes: dict[int, Node] = {}
        for _, _, cid, cname, cat in rows:
            node = Node(cname, categories.index(cat))
            if coarse_nodes.setdefault(cid, node) != node:
                raise TaxonomyError(f"classes.csv gives coarse id {cid} two names or categories")
        if sorted(coarse_nodes) != list(range(len(coarse_nodes))):
            raise TaxonomyError("classes.csv coarse ids are not contiguous from 0")
        if [r[0] for r in rows] != list(range(len(rows))):
            raise TaxonomyError("classes.csv fine ids are not contiguous from 0")
        return cls(["category", "coarse", "fine"], [[Node(c, None) for c in categories],
                                                     [coarse_nodes[i] for i in range(len(coarse_nodes))],
                                                     [Node(fine, cid) for _, fine, cid, _, _ in rows]])

    @classmethod
    def from_folder_tree(cls, root: str | os.PathLike, level_names: Sequence[str] | None = None) -> "Taxonomy":
        """Build from `root/<level0>/<level1>/…/<leaf>/*.jpg` (all leaves at the same depth)."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        leaf_dirs = sorted({p.parent.relative_to(root).parts for p in root.rglob("*") if p.is_file()
                            and p.suffix.lower() in IMAGE_SUFFIXES})
        if not leaf_dirs:
            raise TaxonomyError(f"no images under {root}")
        depths = {len(d) for d in leaf_dirs}
        if len(depths) != 1:
            raise TaxonomyError(f"images under {root} sit at different depths {sorted(depths)}; "
                                "every leaf folder must be at the same depth")
        return cls.from_paths(list(level_names or [f"level{i}" for i in range(depths.pop())]), leaf_dirs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self._hash)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}={s}" for n, s in zip(self._level_names, self.sizes))
        return f"Taxonomy({sizes}, hash={self._hash[:12]})"


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
