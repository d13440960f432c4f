"""Few-shot enrollment on the device, judged leave-classes-out on Grocery.

    python research/enrollment.py --data $HIERFG_GROCERY --out runs/enrollment            # train + export + judge
    python research/enrollment.py --data $HIERFG_GROCERY --out runs/enrollment-whole --config configs/student.yaml \
        --shots 1,5,10 --trials 3                                                               # the reported study

1. A Grocery-style root without HELD_OUT (8 fine classes, one per coarse class that keeps other children,
   so every parent stays in the tree) and without a stratified 20 % slice of `train` (the slice the
   shipped recipe holds out), written under <out>/data with symlinks to the photos.
2. A student trained on it (with --config, that recipe, e.g. the shipped whole-network one; without, the
   cached frozen-prefix path, cheap on one core), exported to ONNX with the embedding output.
3. The embedding statistics (`python -m sdk embedding-stats`) from the reduced root's training photos.
4. For k in --shots and --trials random draws of k training photos per held-out class: every held-out
   class is enrolled through `sdk.Classifier.enroll` (the device path, no torch), then the evaluation
   photos (`val` + the slice, of every class) are decoded by the extended tree. Reported on `val` +
   slice, and on each apart: fine top-1 and full-path accuracy of the enrolled classes, of the other
   classes before and after enrollment; the wall time of one enrollment from k photos; a (sharpness,
   margin) grid at k = 5.

Writes <out>/enrollment.md, <out>/enrollment.json and, when matplotlib is installed, <out>/enrollment.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research.output import write_results  # noqa: E402
from sdk import Taxonomy, load_dataset, stratified_holdout  # noqa: E402

# one per coarse class that has other fine children, over the three departments; each has `val` photos
HELD_OUT = ("Pink-Lady", "Galia-Melon", "Conference", "God-Morgon-Orange-Juice", "Arla-Standard-Milk",
            "Yoggi-Vanilla-Yoghurt", "Yellow-Bell-Pepper", "Vine-Tomato")


def reduced_root(data: Path, out: Path, held_out: tuple[str, ...] = HELD_OUT, seed: int = 0) -> dict[str, Any]:
    """A Grocery root at `out` without the held-out fine classes (ids renumbered) and without the 20 %
    slice of `train`; returns the evaluation and enrollment pools as (path, fine name) lists."""
    full = load_dataset(data, "train")
    tax = full.taxonomy
    fine_names = tax.names(tax.depth - 1)
    missing = set(held_out) - set(fine_names)
    if missing:
        raise SystemExit(f"held-out classes not in the taxonomy: {sorted(missing)}")
    _, hold = stratified_holdout(full, 0.2, seed)
    hold_set = set(hold)
    out.mkdir(parents=True, exist_ok=True)
    with open(data / "classes.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    kept = [r for r in rows[1:] if r and r[0].strip() not in held_out]
    new_id = {r[0].strip(): i for i, r in enumerate(kept)}
    with open(out / "classes.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        w.writerows([[r[0], new_id[r[0].strip()], *r[2:]] for r in kept])
    for split in ("train", "val"):
        link = out / split
        if not link.exists():
            link.symlink_to((data / split).resolve(), target_is_directory=True)
    val = load_dataset(data, "val")
    pools: dict[str, Any] = {"enroll": [], "eval": [], "data": str(data), "held_out": list(held_out)}
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for split, ds in (("train", full), ("val", val)):
        for i, s in enumerate(ds.samples):
            name = fine_names[s.labels[-1]]
            evaluation = split == "val" or i in hold_set
            if evaluation:
                pools["eval"].append((s.source, name))
            elif name in held_out:
                pools["enroll"].append((s.source, name))
            if name not in held_out and not (split == "train" and i in hold_set):
                rel = Path(s.source).relative_to(data).as_posix()
                lines[split].append(f"{rel}, {new_id[name]}, {s.labels[1]}")
    for split, ls in lines.items():
        (out / f"{split}.txt").write_text("\n".join(ls) + "\n")
    Taxonomy.from_grocery(out)  # the reduced classes.csv must still be a valid tree
    return pools


def train_student(root: Path, out: Path, epochs: int, quick: bool = False, config: str | None = None,
                  log=print) -> float:
    """The student the classes are enrolled into; returns the wall time in seconds. Skipped when `out`
    already holds a model. Without `config`: the cheap cached path (frozen first 11 blocks, one cached
    view) at the shipped 224 px with the global read-out. With `config` (e.g. configs/student.yaml): that
    recipe, whole network and all, on the reduced root (its slice is already out, so no holdout)."""
    if (out / "model.safetensors").is_file():
        log(f"reusing the trained student in {out}")
        return float(json.loads((out / "config.json").read_text()).get("enrollment_train_seconds", 0.0))
    from train.loop import TrainConfig, train_model
    from train.models import ModelConfig

    mc = ModelConfig(image_size=224, taps=(10, -1), d_model=192, heads=4, global_head=True, dropout=0.3)
    tc = TrainConfig(data=str(root), epochs=epochs, batch_size=32, lr=3e-3, freeze_blocks=11, cache_views=1,
                     losses="ce,global_ce", threads=1)
    if config:
        import yaml

        recipe = yaml.safe_load(Path(config).read_text())
        mc = ModelConfig.from_dict(recipe.get("model", {}))
        tc = TrainConfig.from_dict({**recipe.get("train", {}), "data": str(root), "holdout_fraction": 0.0, "threads": 1})
    if quick:  # a pipeline check in minutes (the tests' tiny student), not a result
        mc = ModelConfig(image_size=128, d_model=64, heads=2)
        tc = TrainConfig(data=str(root), epochs=1, batch_size=32, limit_per_class=3, limit_val=48, cache_views=1,
                         freeze_blocks=11, lr=3e-3, threads=1)
    t0 = time.time()
    train_model(mc, tc, out, log=log)
    secs = time.time() - t0
    conf = json.loads((out / "config.json").read_text())
    conf["enrollment_train_seconds"] = secs
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    return secs


def sdk_outputs(clf, sources: list[str], batch: int = 32) -> tuple[list[np.ndarray], np.ndarray]:
    """The model's own per-level log-probs and embeddings of photos, through the SDK, decoded once."""
    lps, embs = [], []
    for i in range(0, len(sources), batch):
        lp, emb = clf._run(np.stack([clf.preprocess(s) for s in sources[i:i + batch]]))
        lps.append(lp)
        embs.append(emb)
    return [np.concatenate([b[l] for b in lps]) for l in range(len(lps[0]))], np.concatenate(embs)


def score(tax: Taxonomy, lps: list[np.ndarray], labels: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """Fine top-1 and full-path accuracy of the tree-consistent greedy paths on `rows`; every decoded
    path is also checked to be a root-to-leaf path of `tax` (consistency)."""
    from sdk import TreeDecoder

    paths = TreeDecoder(tax).paths([lp[rows] for lp in lps])
    anc = np.asarray(tax.ancestor_matrix())
    consistent = float((anc[paths[:, -1]] == paths).all(1).mean()) if len(paths) else float("nan")
    lab = labels[rows]
    return {"fine_top1": float((paths[:, -1] == lab[:, -1]).mean()), "full_path": float((paths == lab).all(1).mean()),
            "coarse_top1": float((paths[:, 1] == lab[:, 1]).mean()), "consistency": consistent, "n": int(len(rows))}


def labels_in(tax: Taxonomy, names: list[str]) -> np.ndarray:
    """(N, depth) indices of each photo's fine class (by name) and its ancestors in `tax`."""
    leaf = tax.depth - 1
    anc = np.asarray(tax.ancestor_matrix())
    return np.stack([anc[tax.index(leaf, n)] for n in names])


def enroll_trial(clf, full: Taxonomy, pools: dict, k: int, rng: np.random.Generator, params: list[tuple]) -> dict:
    """One draw of k photos per held-out class: each class enrolled through the SDK (timed), then the
    fits for every (sharpness, margin) in `params` from the same model outputs."""
    from dataclasses import replace

    from sdk._enroll import Enrollment, fit_class, mirror_views

    fits: dict[tuple, list] = {p: [] for p in params}
    seconds = []
    for name in pools["held_out"]:
        photos = [s for s, n in pools["enroll"] if n == name]
        chosen = [photos[i] for i in rng.choice(len(photos), size=min(k, len(photos)), replace=False)]
        parent = full.node(full.depth - 2, full.parent(full.depth - 1, full.index(full.depth - 1, name))).name
        if k >= 2:  # Classifier.enroll refuses one photo; k = 1 is measured through fit_class below
            t0 = time.perf_counter()
            clf.enroll(name, parent, chosen, save=False)  # the device path, timed end to end (decode, model, fit)
            seconds.append(time.perf_counter() - t0)
            clf.forget(name, save=False)
        views, photo = mirror_views(np.stack([clf.preprocess(s) for s in chosen]))
        fit = fit_class(name, parent, clf._run(views)[1], photo, clf._stats, clf.base_taxonomy)
        for sh, mg in params:  # only scale and bias depend on them: the shipped fit with other ones
            fits[(sh, mg)].append(replace(fit, scale=sh, bias=-sh * mg))
    return {"seconds": seconds, "enrollments": {p: Enrollment(tuple(c)) for p, c in fits.items()}}


def parent_share(full: Taxonomy, base: Taxonomy, lps: list[np.ndarray], names: list[str], held: np.ndarray) -> float:
    """Share of the held-out classes' evaluation photos whose trained model puts the most mass on their
    true parent: what an enrolled class could reach if it only split its parent's mass."""
    leaf, up = full.depth - 1, full.depth - 2
    rows = np.flatnonzero(held)
    true = [base.index(up, full.node(up, full.parent(leaf, full.index(leaf, names[i]))).name) for i in rows]
    return float(np.mean(lps[up][rows].argmax(1) == np.array(true)))


def judge(out: Path, pools: dict, shots: list[int], trials: int, train_secs: float, recipe: str = "", log=print) -> int:
    """Export, write the embedding statistics, enroll every held-out class for each k and trial, score
    before / after; write the table."""
    from converters import export_checkpoint
    from sdk import Classifier
    from sdk._enroll import MARGIN, SHARPNESS

    art = out / "onnx"
    if not (art / "manifest.json").is_file():
        export_checkpoint(out / "student", "onnx", art, data=str(out / "data"), split="val", n_parity=64)
    clf = Classifier.load(art, enrollment=False)
    base = clf.base_taxonomy
    if clf._stats is None:  # the reduced root's train split is exactly what the student was trained on
        ds = load_dataset(out / "data", "train", taxonomy=base)
        t0 = time.time()
        clf.write_embedding_stats([x.source for x in ds.samples],
                                  [base.node(base.depth - 1, int(i)).name for i in ds.labels()[:, -1]],
                                  source=f"{out / 'data'}:train, {len(ds)} photos")
        log(f"embedding statistics from {len(ds)} training photos in {time.time() - t0:.0f}s")
    full = Taxonomy.from_grocery(Path(pools["data"]))
    sources, names = [s for s, _ in pools["eval"]], [n for _, n in pools["eval"]]
    t0 = time.time()
    lps, emb = sdk_outputs(clf, sources)
    log(f"{len(sources)} evaluation photos through the SDK in {time.time() - t0:.0f}s")
    held = np.array([n in pools["held_out"] for n in names])
    in_val = np.array(["/val/" in Path(s).as_posix() for s in sources])
    others = np.flatnonzero(~held)
    parts = {"pooled": np.ones(len(names), bool), "val": in_val, "slice": ~in_val}

    def before(mask):
        rows = np.flatnonzero(~held & mask)
        return score(base, [lp[rows] for lp in lps], labels_in(base, [names[i] for i in rows]), np.arange(len(rows)))
    params = sorted({(SHARPNESS, MARGIN), *[(sh, mg) for sh in (20.0, 50.0, 100.0) for mg in (-0.02, 0.0, 0.02)]})
    rows: list[dict[str, Any]] = []
    for k in shots:
        for trial in range(trials):
            res = enroll_trial(clf, full, pools, k, np.random.default_rng(1000 * k + trial), params)
            for (sh, mg), enr in res["enrollments"].items():
                tax = enr.taxonomy(base)
                ext = enr.extend(lps, emb, base, clf._stats)
                lab = labels_in(tax, names)
                rows.append({"k": k, "trial": trial, "sharpness": sh, "margin": mg, "enroll_seconds": res["seconds"],
                             **{f"{part}/{who}": score(tax, ext, lab, np.flatnonzero(mask & sel))
                                for part, mask in parts.items() for who, sel in (("enrolled", held), ("others", ~held))}})
        log(f"k={k}: {trials} trials done")
    record = {"recipe": recipe or "cached frozen-backbone path", "held_out": pools["held_out"], "train_seconds": train_secs,
              "others_before": {part: before(mask) for part, mask in parts.items()}, "rows": rows,
              "parent_share": parent_share(full, base, lps, names, held),
              "defaults": {"sharpness": SHARPNESS, "margin": MARGIN},
              "eval_photos": {"enrolled": int(held.sum()), "others": int(len(others)),
                              "enrolled_val": int((held & in_val).sum()), "others_val": int((~held & in_val).sum())}}
    md = table(record)
    plot(record, out / "enrollment.png")
    return write_results(out, "enrollment", record, md)


def _mean(rows: list[dict], key: str, sub: str) -> float:
    return float(np.mean([r[key][sub] for r in rows]))


def table(rec: dict[str, Any]) -> str:
    """Markdown: the shipped defaults per k (pooled, then val and slice apart), then the (sharpness,
    margin) grid at k = 5."""
    d, b, e = rec["defaults"], rec["others_before"], rec["eval_photos"]
    lines = [f"Held out: {', '.join(rec['held_out'])} ({e['enrolled']} evaluation photos, {e['enrolled_val']} of them "
             f"val, the rest the 20 % slice); other classes: {e['others']} photos ({e['others_val']} val). Student "
             f"({rec.get('recipe', 'cached path')}) trained in {rec['train_seconds'] / 60:.0f} min on one core. "
             f"Mean over trials.", "",
             f"Defaults (sharpness {d['sharpness']:g}, margin {d['margin']:g}):", "",
             "| k | photos | enrolled fine top-1 | enrolled full path | others fine top-1 before → after | drop (pt) "
             "| consistency | enroll one class (s, mean / max) |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted({r["k"] for r in rec["rows"]}):
        rs = [r for r in rec["rows"] if r["k"] == k and (r["sharpness"], r["margin"]) == (d["sharpness"], d["margin"])]
        secs = [s for r in rs for s in r["enroll_seconds"]]
        for part in ("pooled", "val", "slice"):
            after = _mean(rs, f"{part}/others", "fine_top1")
            cons = min(min(r[f"{part}/enrolled"]["consistency"], r[f"{part}/others"]["consistency"]) for r in rs)
            lines.append(f"| {k} | {part} | {_mean(rs, f'{part}/enrolled', 'fine_top1'):.3f} | "
                         f"{_mean(rs, f'{part}/enrolled', 'full_path'):.3f} | {b[part]['fine_top1']:.3f} → {after:.3f} | "
                         f"{100 * (b[part]['fine_top1'] - after):.2f} | {cons:.3f} | "
                         + ((f"{np.mean(secs):.2f} / {np.max(secs):.2f} |" if secs else "refused (< 2 photos) |")
                            if part == "pooled" else "|"))
    lines += ["", f"The trained model puts the most mass on the true parent for {rec['parent_share']:.1%} of the "
              "held-out classes' photos: a new leaf that only split its parent's mass could not win the rest."]
    margins = sorted({r["margin"] for r in rec["rows"]})
    lines += ["", "k = 5, pooled, enrolled fine top-1 / others' drop in pt:", "",
              "| sharpness \\ margin | " + " | ".join(f"{m:g}" for m in margins) + " |", "|---" * (1 + len(margins)) + "|"]
    for sh in sorted({r["sharpness"] for r in rec["rows"]}):
        cells = []
        for mg in margins:
            rs = [r for r in rec["rows"] if r["k"] == 5 and r["sharpness"] == sh and r["margin"] == mg]
            cells.append(f"{_mean(rs, 'pooled/enrolled', 'fine_top1'):.3f} / "
                         f"{100 * (b['pooled']['fine_top1'] - _mean(rs, 'pooled/others', 'fine_top1')):.2f}" if rs else "–")
        lines.append(f"| {sh:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rec: dict[str, Any], path: Path) -> None:
    """Fine top-1 of the enrolled and of the other classes against k (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib")
        return
    d = rec["defaults"]
    ks = sorted({r["k"] for r in rec["rows"]})
    rs = {k: [r for r in rec["rows"] if r["k"] == k and (r["sharpness"], r["margin"]) ==
              (d["sharpness"], d["margin"])] for k in ks}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [_mean(rs[k], "pooled/enrolled", "fine_top1") for k in ks], "o-", label="enrolled classes")
    ax.plot(ks, [_mean(rs[k], "pooled/others", "fine_top1") for k in ks], "s-", label="other classes, after")
    ax.axhline(rec["others_before"]["pooled"]["fine_top1"], ls="--", c="gray", label="other classes, before")
    ax.set(xlabel="photos per enrolled class (k)", ylabel="fine top-1", xticks=ks, ylim=(0, 1))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="Grocery Store root")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=8, help="epochs of the cached path (a --config recipe sets its own)")
    p.add_argument("--config", help="train the student with this recipe (e.g. configs/student.yaml) instead of "
                                    "the cached frozen-backbone path")
    p.add_argument("--held-out", default=",".join(HELD_OUT),
                   help="fine classes left out of training and enrolled (default: one per parent with other children)")
    p.add_argument("--shots", default="1,5,10")
    p.add_argument("--trials", type=int, default=3, help="random draws of the enrollment photos per k")
    p.add_argument("--train-only", action="store_true", help="stop after training (the judging needs the export)")
    p.add_argument("--quick", action="store_true", help="a tiny 128 px model trained for one epoch: checks the pipeline")
    args = p.parse_args(argv)
    out = Path(args.out)
    pools = reduced_root(Path(args.data), out / "data", tuple(n.strip() for n in args.held_out.split(",") if n.strip()))
    secs = train_student(out / "data", out / "student", args.epochs, args.quick, args.config)
    if args.train_only:
        print(f"trained {out / 'student'} in {secs:.0f}s")
        return 0
    return judge(out, pools, [int(k) for k in args.shots.split(",")], args.trials, secs, args.config or "")


if __name__ == "__main__":
    sys.exit(main())
