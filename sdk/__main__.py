"""`python -m sdk classify|info|calibrate|embedding-stats|enroll|forget --model DIR …`: the SDK's commands.

Errors print one line (`error: …`) to stderr, no traceback. Exit codes: 0 ok, 1 some images could not be
classified, 2 usage / model / data error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _calibrate as C
from ._classifier import Classifier, ItemError
from ._enroll import ENROLLMENT_NAME
from ._errors import HierfgError
from ._manifest import MANIFEST_NAME, Manifest
from .datasets import load_dataset, restrict_to_list, stratified_holdout


class _Progress:
    """A dependency-free progress bar on stderr (the SDK does not depend on tqdm)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.n = total, desc, 0
        self.enabled = enabled and total > 1

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.enabled:
            done = 30 * self.n // self.total
            print(f"\r{self.desc} [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total}", end="", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _names(values: Sequence[str] | None) -> list[str] | None:
    return [n.strip() for v in values for n in v.split(",") if n.strip()] if values else None


def _fmt_pred(pred: Any) -> str:
    if pred.is_unknown:
        return f"unknown item (out-of-catalogue score {pred.unknown_score:.3f})"
    text = " › ".join(f"{p.label} ({p.probability:.0%})" for p in pred.path) or "uncertain"
    if not pred.is_complete:
        nxt = pred.full_path[len(pred.path)]
        text += f"  [stopped above {nxt.level}; best guess {nxt.label} {nxt.probability:.0%}]"
    return text


def _classifier(args: argparse.Namespace) -> Classifier:
    return Classifier.load(args.model, backend=args.backend, num_threads=args.threads)


def cmd_classify(args: argparse.Namespace) -> int:
    clf = _classifier(args)
    thresholds = [float(x) for x in args.thresholds.split(",")] if args.thresholds else None
    kw = dict(top_k=args.top_k, thresholds=thresholds, allow=_names(args.allow), deny=_names(args.deny))
    if args.no_unknown:
        kw["unknown_threshold"] = None
    bar = _Progress(len(args.images), "classifying", enabled=len(args.images) >= 8 and not args.quiet)
    failed = 0
    chunk = 16  # so the bar moves and memory stays bounded for thousands of files
    for start in range(0, len(args.images), chunk):
        names = args.images[start:start + chunk]
        for name, r in zip(names, clf.classify_batch(names, **kw)):
            bad = isinstance(r, ItemError)
            failed += bad
            if args.json:
                row = {"error": type(r.error).__name__, "message": str(r.error)} if bad else r.to_dict()
                print(json.dumps({"image": name, **row}, ensure_ascii=False))
                continue
            if bar.enabled:
                sys.stderr.write("\n" if bad else "\r")
            if bad:
                print(f"error: {name}: {type(r.error).__name__}: {r.error}", file=sys.stderr)
                continue
            print(f"{name}: {_fmt_pred(r)}")
            if args.top_k > 1 and args.verbose:
                for level, items in r.top_k.items():
                    print(f"    {level:>10}: " + ", ".join(f"{l} {s:.0%}" for l, s in items))
        bar.update(len(names))
    bar.close()
    return 1 if failed else 0


def cmd_info(args: argparse.Namespace) -> int:
    m = Manifest.load(args.model)
    if args.json:
        print(m.to_json())
        return 0
    tax = m.taxonomy
    print(f"model      {Path(args.model)}")
    print(f"target     {m.target} ({m.precision})  file {m.file}  {m.size_bytes / 1e6:.1f} MB  "
          f"sha256 {m.sha256[:16]}…")
    print(f"input      {m.input.size}x{m.input.size} {m.input.color} {m.input.dtype} {m.input.layout}; "
          f"{m.input.resize}")
    print(f"taxonomy   {' > '.join(f'{n} ({s})' for n, s in zip(tax.level_names, tax.sizes))}  hash {tax.hash[:12]}…")
    print(f"outputs    {', '.join(m.outputs)}")
    emb = m.embedding
    print(f"embedding  {emb['dim']}-d {emb.get('normalized', '')} ({emb.get('feature', '?')})" if emb else
          "embedding  none (exported before enrollment existed; re-export to enroll products)")
    if emb:
        st = emb.get("stats")
        print(f"enrolling  statistics {st['file']} ({st.get('data') or str(st.get('photos', '?')) + ' photos'})" if st
              else "enrolling  no embedding statistics yet: `python -m sdk embedding-stats --model DIR --data DATASET`")
    dec = m.decoding or {}
    if dec.get("thresholds") is not None:
        th = ", ".join(f"{n}={t:.3f}" for n, t in zip(tax.level_names, dec["thresholds"]))
        cal = dec.get("calibration", {})
        print(f"back-off   {th}  (target precision {cal.get('target_precision', '?')}, data {cal.get('data', '?')})")
    else:
        print("back-off   none (every level answered; run `python -m sdk calibrate`)")
    if dec.get("unknown_threshold") is not None:
        print(f"unknown    {dec.get('unknown_score')} > {dec['unknown_threshold']:.3f}")
    par = m.metrics.get("parity")
    if par:
        print(f"parity     path agreement {par.get('agreement/path', float('nan')):.3f} on {par.get('n_images')} "
              f"images vs {par.get('reference', '?')}")
    if m.tool_versions:
        print("tools      " + ", ".join(f"{k} {v}" for k, v in m.tool_versions.items()))
    print(f"created    {m.created}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    clf = _classifier(args)
    cls = clf.enroll(args.label, args.parent, args.images)
    cal = cls.calibration
    rivals = ", ".join(f"{k} ({v})" for k, v in cal["nearest_trained"].items())
    print(f"enrolled {cls.label!r} under {cls.parent!r} from {cls.n_photos} photos: left out in turn, each photo is "
          f"nearer the others' prototype than to every trained class in {cal['own_wins']:.0%} of views "
          f"(mean margin {cal['own_margin_mean']:+.3f}); nearest trained classes: {rivals}")
    print(f"wrote {clf.directory / ENROLLMENT_NAME} ({len(clf.enrolled)} enrolled classes)")
    return 0


def cmd_embedding_stats(args: argparse.Namespace) -> int:
    clf = _classifier(args)
    ds = load_dataset(args.data, args.split, taxonomy=clf.base_taxonomy)
    # the photos training saw: the 20 % slice stays unseen, as in `python -m train`
    keep = list(range(len(ds))) if args.with_slice else stratified_holdout(ds, 0.2, seed=0)[0]
    if args.per_class:
        fine = ds.labels()[:, -1]
        keep = [i for c in np.unique(fine[keep]) for i in [j for j in keep if fine[j] == c][:args.per_class]]
    sub = ds.subset(sorted(keep))
    leaf = clf.base_taxonomy.depth - 1
    names = [clf.base_taxonomy.node(leaf, int(i)).name for i in sub.labels()[:, -1]]
    source = f"{args.data}:{args.split}{'' if args.with_slice else ' without the 20 % slice'}, {len(sub)} photos"
    rec = clf.write_embedding_stats([x.source for x in sub.samples], names, source=source)
    print(f"wrote {clf.directory / rec['file']} ({rec['photos']} photos, {rec['classes']} classes, rank {rec['rank']}) "
          f"and its sha256 into {clf.directory / MANIFEST_NAME}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    clf = _classifier(args)
    clf.forget(args.label)
    print(f"forgot {args.label!r}; wrote {clf.directory / ENROLLMENT_NAME} ({len(clf.enrolled)} enrolled classes left)")
    return 0


def _print_report(title: str, rep: dict[str, Any]) -> None:
    print(title)
    for k, v in rep.items():
        print(f"  {k:32} {v:.4f}" if isinstance(v, float) else f"  {k:32} {v}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    clf = _classifier(args)
    names = clf.taxonomy.level_names

    def load(split: str, listing: str | None) -> tuple[Any, list[np.ndarray], str]:
        ds = load_dataset(args.data, split, taxonomy=clf.taxonomy)
        if listing:
            try:
                ds = restrict_to_list(ds, listing)
            except ValueError as e:
                raise HierfgError(str(e)) from None
        if args.limit and len(ds) > args.limit:
            ds = ds.subset(np.linspace(0, len(ds) - 1, args.limit).round().astype(int).tolist())
        source = f"{args.data}:{split}" + (f" ({listing})" if listing else "") + f", {len(ds)} images"
        return ds, logprobs([s.source for s in ds.samples], f"{split} ({len(ds)} images)"), source

    def logprobs(sources: list[Any], desc: str) -> list[np.ndarray]:
        bar = _Progress(len(sources), desc)
        try:
            return C.batch_logprobs(clf, sources, progress=bar.update)
        finally:
            bar.close()

    ds, lp, source = load(args.split, args.holdout_list)
    ood = C.out_of_catalogue_images(args.ood_per_kind, seed=args.seed)
    ood_lp = logprobs([img for _, img in ood], f"out-of-catalogue ({len(ood)} generated)")
    cal = C.calibrate(clf, lp, ds.labels(), ood_lp, [k for k, _ in ood], args.target_precision,
                      args.max_false_unknown)
    decoding = cal.decoding(args.target_precision, args.max_false_unknown, source, names)
    print("thresholds  " + ", ".join(f"{n}={t:.4f}" for n, t in zip(names, cal.thresholds)))
    print(f"unknown     {cal.unknown_score} > {cal.unknown_threshold:.4f}")
    _print_report(f"calibration set {source}:", cal.report)
    _print_report(f"generated out-of-catalogue images ({', '.join(C.OUT_OF_CATALOGUE_KINDS)}):", cal.ood_report)
    for split in args.eval_split or []:
        eds, elp, esource = load(split, args.eval_list)
        rep = C.decoding_report(C.decode_set(clf.taxonomy, elp, eds.labels()), cal.thresholds, cal.unknown_score,
                                cal.unknown_threshold, names)
        decoding["calibration"].setdefault("eval", {})[split] = rep
        _print_report(f"evaluation on {esource}, at these thresholds:", rep)
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(decoding, indent=1))
    if args.dry_run:
        print("dry run: manifest not changed")
    else:
        print(f"wrote thresholds to {C.write_decoding(clf.directory, decoding)} ('decoding')")
    return 0


MODEL_HELP = "model directory (artifact + manifest.json) or its manifest.json; the repository bundles demo/model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdk", description="hierfg SDK: classify images with an exported model")
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, fn, help: str, runtime: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(fn=fn, parser=sp)
        sp.add_argument("--model", metavar="DIR", help=MODEL_HELP)
        if runtime:
            sp.add_argument("--backend", help="runtime backend (default: the manifest's target)")
            sp.add_argument("--threads", type=int, help="runtime threads")
        return sp

    c = command("classify", cmd_classify, "classify image files; prints the (backed-off) path per image")
    c.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    c.add_argument("--json", action="store_true", help="one JSON object per line")
    c.add_argument("--top-k", type=int, default=3)
    c.add_argument("--thresholds", help="per-level thresholds, comma separated (default: manifest)")
    c.add_argument("--allow", action="append", help="only answer under these nodes (name or level:name; repeatable)")
    c.add_argument("--deny", action="append", help="never answer under these nodes")
    c.add_argument("--no-unknown", action="store_true", help="do not flag out-of-catalogue items")
    c.add_argument("-v", "--verbose", action="store_true", help="also print the top-k per level")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    i = command("info", cmd_info, "print the manifest summary of a model", runtime=False)
    i.add_argument("positional_model", nargs="?", metavar="MODEL", help="the same as --model (older form)")
    i.add_argument("--json", action="store_true", help="print the whole manifest")

    k = command("calibrate", cmd_calibrate, "pick back-off and unknown thresholds on labelled data; write the manifest")
    k.add_argument("--data", required=True, help="dataset root (Grocery Store root or folder tree)")
    k.add_argument("--split", default="val")
    k.add_argument("--holdout-list", help="only the images listed in this file (e.g. a run's holdout.txt)")
    k.add_argument("--target-precision", type=float, default=0.98)
    k.add_argument("--max-false-unknown", type=float, default=0.05, help="share of real items flagged unknown at most")
    k.add_argument("--ood-per-kind", type=int, default=16, help="generated out-of-catalogue images per kind")
    k.add_argument("--eval-split", action="append", help="also report figures on this split (repeatable)")
    k.add_argument("--eval-list", help="evaluate only the images of --eval-split listed in this file (e.g. a run's "
                   "holdout.txt: calibrate on val, judge on the train slice the model never saw)")
    k.add_argument("--limit", type=int, default=0, help="use at most N images of the split (evenly spaced)")
    k.add_argument("--report-json", help="also write the full report here")
    k.add_argument("--dry-run", action="store_true", help="do not change the manifest")
    k.add_argument("--seed", type=int, default=0)

    e = command("enroll", cmd_enroll, f"add a product under a parent from its photos (writes {ENROLLMENT_NAME})")
    e.add_argument("images", nargs="+", help="photos of the product (5-10 recommended)")
    e.add_argument("--label", required=True, help="name of the new product")
    e.add_argument("--parent", required=True, help="the node it belongs under (a name at the level above the leaves)")

    st = command("embedding-stats", cmd_embedding_stats,
                 "fit where the trained classes sit in the embedding (needed once before enrolling)")
    st.add_argument("--data", required=True, help="the dataset the model was trained on (Grocery root or folder tree)")
    st.add_argument("--split", default="train")
    st.add_argument("--with-slice", action="store_true",
                    help="also use the 20 %% of the split that training holds out (default: leave it out)")
    st.add_argument("--per-class", type=int, default=0, help="at most N photos per class (0: all)")

    f = command("forget", cmd_forget, f"remove an enrolled product (rewrites {ENROLLMENT_NAME})")
    f.add_argument("--label", required=True, help="the enrolled product to remove")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    legacy = getattr(args, "positional_model", None)
    if legacy and args.model and legacy != args.model:
        args.parser.error(f"two models given ({legacy} and --model {args.model}); pass one --model DIR")
    args.model = args.model or legacy
    if not args.model:
        args.parser.error(f"--model DIR is required: the {MODEL_HELP}")
    try:
        return args.fn(args)
    except (HierfgError, OSError, ValueError) as e:
        # users get one line that says what is wrong; the exception types say which class of problem
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
