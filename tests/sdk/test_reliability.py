"""RELIABILITY.md, one test (or a few) per row, against the real SDK and a real exported model.

Bad files are generated in tmp dirs with Pillow / numpy; the model is the tiny student exported to
ONNX (`onnx_artifact_dir`). Row 15 (threads) lives in test_concurrency.py.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdk
import sdk._image as image_mod
from sdk import (Classifier, HierarchicalPrediction, InvalidImageError, ItemError, ModelIntegrityError,
                 ModelOutputError, Taxonomy, UnsupportedFormatError, load_image, prepare)
from sdk._backends import _BACKENDS


S = 128  # the fixture model's input size


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG that *declares* w x h (8-bit RGB) with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _is_prediction(p, tax: Taxonomy) -> None:
    assert isinstance(p, HierarchicalPrediction)
    assert len(p.full_path) == tax.depth


# ---- row 1: empty file, random bytes, a text file named .jpg ---------------------------------------
@pytest.mark.parametrize("content", [b"", np.random.default_rng(0).bytes(4096), b"hello, I am text\n" * 20],
                         ids=["empty", "random-bytes", "text"])
def test_row1_garbage_files_raise_invalid_image(classifier, tmp_path, content):
    f = tmp_path / "photo.jpg"
    f.write_bytes(content)
    with pytest.raises(InvalidImageError):
        classifier.classify(f)
    with pytest.raises(InvalidImageError):
        classifier.classify(content)


# ---- row 2: truncated JPEG / PNG -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_row2_truncated_files_raise_invalid_image(classifier, banana_jpg, tmp_path, fmt):
    from PIL import ImageFile
    img = load_image(banana_jpg).resize((400, 300))
    data = _bytes(img, fmt)
    f = tmp_path / f"cut.{fmt.lower()}"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="truncated|corrupt"):
        classifier.classify(f)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the SDK must not flip Pillow's global switch


# ---- row 3: decompression bomb, file size cap ------------------------------------------------------
@pytest.mark.parametrize("w,h", [(30000, 30000), (12000, 9000)])
def test_row3_bomb_rejected_from_header_before_decoding(tmp_path, w, h):
    f = tmp_path / "bomb.png"
    f.write_bytes(_png_header_only(w, h))
    assert f.stat().st_size < 500
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImageError, match="too large|pixel limit"):
            prepare(f, S)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # decoding would need w*h*3 bytes (>= 324 MB); rejecting from the header needs almost nothing
    assert peak < 5_000_000


def test_row3_file_size_is_capped(tmp_path, monkeypatch, banana_jpg):
    data = banana_jpg.read_bytes()
    monkeypatch.setattr(image_mod, "MAX_FILE_BYTES", len(data) - 1)
    with pytest.raises(InvalidImageError, match="limit"):
        prepare(banana_jpg, S)
    with pytest.raises(InvalidImageError, match="limit"):
        prepare(data, S)


# ---- row 4: a real 48-megapixel photo in bounded memory --------------------------------------------
@pytest.mark.slow
def test_row4_48_megapixel_jpeg_decodes_in_bounded_memory(tmp_path, banana_jpg):
    # A real photo upscaled to 8000x6000 plus sensor-like noise: a camera-sized JPEG made on the fly.
    big = load_image(banana_jpg).resize((8000, 6000), Image.Resampling.BILINEAR)
    arr = np.asarray(big).copy()
    arr += np.random.default_rng(0).integers(0, 4, arr.shape, dtype=np.uint8)
    f = tmp_path / "48mp.jpg"
    Image.fromarray(arr).save(f, "JPEG", quality=85)
    del big, arr
    full_decode = 8000 * 6000 * 3
    # peak RSS is a process-wide high-water mark, so measure in a fresh interpreter
    code = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        from sdk import prepare
        prepare(np.zeros((8, 8, 3), np.uint8), {S})  # warm up imports and allocators
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x = prepare({str(f)!r}, {S})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert x.shape == ({S}, {S}, 3) and x.dtype == np.uint8
        print((after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    delta = int(out.stdout.strip())
    file_size = f.stat().st_size
    # the file bytes are held once, plus the draft()-reduced decode (1/8 scale: 1000x750); a full
    # decode would add 144 MB. Generous bound: file + 40 MB, still far below a full decode.
    assert delta < file_size + 40_000_000, (delta, file_size)
    assert delta < full_decode / 2


# ---- row 5: extreme aspect ratio -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 10000), (10000, 1), (3, 9000)])
def test_row5_extreme_aspect_is_center_cropped_not_blown_up(classifier, shape):
    h, w = shape
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 2] = 255  # blue ends
    if w > h:
        arr[:, w // 2 - 2: w // 2 + 2] = (255, 0, 0)
    else:
        arr[h // 2 - 2: h // 2 + 2, :] = (255, 0, 0)
    x = prepare(arr, S)
    assert x.shape == (S, S, 3)
    # documented policy: centre-crop the long side to <= 4:3, so only the red middle survives
    assert (x[..., 0] == 255).all() and (x[..., 2] == 0).all()
    _is_prediction(classifier.classify(arr), classifier.taxonomy)


# ---- row 6: tiny and zero-size ---------------------------------------------------------------------
def test_row6_one_pixel_image_is_classified(classifier, tmp_path):
    f = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(f)
    _is_prediction(classifier.classify(f), classifier.taxonomy)
    assert (prepare(f, S) == (200, 30, 30)).all()


def test_row6_zero_size_images_are_errors(classifier):
    with pytest.raises(InvalidImageError, match="zero-size"):
        classifier.classify(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(InvalidImageError, match="zero-size"):
        classifier.classify(Image.new("RGB", (0, 0)))
    with pytest.raises(InvalidImageError):
        classifier.classify(_png_header_only(0, 10))


# ---- row 7: EXIF orientation 2-8 -------------------------------------------------------------------
# The transpose that turns an upright picture into what a camera stores for each orientation tag
# (the inverse of what ImageOps.exif_transpose applies when reading).
_T = Image.Transpose
_STORED = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
           6: _T.ROTATE_90, 7: _T.TRANSVERSE, 8: _T.ROTATE_270}


@pytest.fixture(scope="module")
def upright(banana_jpg) -> Image.Image:
    img = load_image(banana_jpg)
    return img.resize((320, 240))  # DCT-block aligned, so a rotated JPEG re-encodes the same blocks


@pytest.mark.parametrize("orientation", range(2, 9))
def test_row7_exif_orientation_classifies_like_upright(classifier, upright, tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(_STORED[orientation])
    # lossless container: the decoded pixels must be identical, so the answer is identical
    png = tmp_path / f"o{orientation}.png"
    stored.save(png, exif=exif.tobytes())
    ref_png = tmp_path / "upright.png"
    upright.save(ref_png)
    assert np.array_equal(prepare(png, S), prepare(ref_png, S))
    assert classifier.classify(png).to_dict() == classifier.classify(ref_png).to_dict()
    # the phone case: JPEG with the tag; only re-encoding noise may differ
    jpg = tmp_path / f"o{orientation}.jpg"
    stored.save(jpg, quality=95, subsampling=0, exif=exif.tobytes())
    ref_jpg = tmp_path / "upright.jpg"
    upright.save(ref_jpg, quality=95, subsampling=0)
    a, b = prepare(jpg, S).astype(int), prepare(ref_jpg, S).astype(int)
    assert np.abs(a - b).mean() < 2.0
    pa, pb = classifier.classify(jpg), classifier.classify(ref_jpg)
    assert pa.full_path[0].label == pb.full_path[0].label
    assert abs(pa.full_path[0].probability - pb.full_path[0].probability) < 0.05


def test_row7_training_uses_the_same_orientation(upright, tmp_path):
    from train.data import Sample, load_view
    exif = Image.Exif()
    exif[0x0112] = 6
    f = tmp_path / "o6.png"
    upright.transpose(_STORED[6]).save(f, exif=exif.tobytes())
    assert np.array_equal(load_view(Sample(str(f), (0, 0, 0)), S, 0, 0), prepare(upright, S))


# ---- row 8: corrupt EXIF -----------------------------------------------------------------------------
def test_row8_corrupt_exif_is_ignored(classifier, banana_jpg):
    data = banana_jpg.read_bytes()
    assert data[:2] == b"\xff\xd8"
    junk = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff\x13" * 40  # TIFF header, garbage IFD
    app1 = b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk
    bad = data[:2] + app1 + data[2:]
    assert np.array_equal(prepare(bad, S), prepare(data, S))
    assert classifier.classify(bad).to_dict() == classifier.classify(data).to_dict()


# ---- row 9: modes ------------------------------------------------------------------------------------
def _mode_image(mode: str) -> tuple[Image.Image, str]:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (220, 40, 40)
    rgb[:, 30:] = (30, 60, 200)
    base = Image.fromarray(rgb)
    if mode == "P+transparency":
        p = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        idx = np.asarray(p)[0, 0]
        p.info["transparency"] = int(idx)
        return p, "PNG"
    if mode == "I;16":
        a = np.tile(np.linspace(1000, 3000, 60), (40, 1)).astype(np.uint16)
        return Image.fromarray(a), "PNG"
    if mode == "I":
        a = np.tile(np.linspace(-70000, 70000, 60), (40, 1)).astype(np.int32)
        return Image.fromarray(a), "TIFF"
    if mode == "F":
        a = np.tile(np.linspace(-1.0, 1.0, 60), (40, 1)).astype(np.float32)
        return Image.fromarray(a), "TIFF"
    if mode in ("RGBA", "LA"):
        im = base.convert(mode)
        alpha = np.full((40, 60), 255, np.uint8)
        alpha[:, :10] = 0  # fully transparent strip
        im.putalpha(Image.fromarray(alpha))
        return im, "PNG"
    if mode == "CMYK":
        return base.convert("CMYK"), "TIFF"
    return base.convert(mode), "PNG"


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P", "P+transparency", "RGBA", "CMYK", "I;16", "I", "F"])
def test_row9_every_mode_becomes_8bit_rgb(classifier, tmp_path, mode):
    img, fmt = _mode_image(mode)
    f = tmp_path / f"m.{fmt.lower()}"
    img.save(f, fmt)
    out = load_image(f)
    assert out.mode == "RGB" and out.size == (60, 40)
    a = np.asarray(out)
    if mode in ("RGBA", "LA"):
        assert (a[:, :10] == 255).all(), "transparent pixels are composited on white"
        assert not (a[:, 12:] == 255).all()
    if mode == "P+transparency":
        assert (a[0, 0] == 255).all()
    if mode in ("I;16", "I", "F"):
        # rescaled from the image's own range, not clamped: darkest -> 0, brightest -> 255, a ramp between
        g = a[0, :, 0]
        assert g[0] == 0 and g[-1] == 255 and (np.diff(g.astype(int)) >= 0).all() and len(np.unique(g)) > 30
    _is_prediction(classifier.classify(f), classifier.taxonomy)


# ---- row 10: animated / multi-page: first frame ------------------------------------------------------
@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF"])
def test_row10_first_frame_of_animated_or_multipage(classifier, tmp_path, fmt):
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    f = tmp_path / f"anim.{fmt.lower()}"
    kw = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(f, fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
    with Image.open(f) as check:
        assert getattr(check, "n_frames", 1) == 3
    a = np.asarray(load_image(f))
    assert (np.abs(a.astype(int) - (255, 0, 0)) <= 2).all()
    _is_prediction(classifier.classify(f), classifier.taxonomy)


# ---- row 11: format allowlist by content ---------------------------------------------------------------
def _psd() -> bytes:
    # header of a 1-channel 8-bit 4x4 PSD, empty sections, raw image data
    return (b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, 4, 4, 8, 1) + struct.pack(">III", 0, 0, 0)
            + struct.pack(">H", 0) + b"\x80" * 16)


@pytest.mark.parametrize("fmt", ["EPS", "PDF", "PSD", "ICO"])
def test_row11_formats_outside_allowlist(classifier, tmp_path, fmt):
    img = Image.new("RGB", (16, 16), "red")
    data = _psd() if fmt == "PSD" else _bytes(img, fmt)
    f = tmp_path / "looks-fine.jpg"  # the extension must not matter
    f.write_bytes(data)
    with pytest.raises(UnsupportedFormatError, match="not supported"):
        classifier.classify(f)
    with pytest.raises(UnsupportedFormatError):
        classifier.classify(data)


def test_row11_png_named_jpg_works(classifier, banana_jpg, tmp_path):
    img = load_image(banana_jpg)
    f = tmp_path / "actually-a-png.jpg"
    img.save(f, "PNG")
    g = tmp_path / "same.png"
    img.save(g, "PNG")
    assert classifier.classify(f).to_dict() == classifier.classify(g).to_dict()


# ---- row 12: numpy input contract ----------------------------------------------------------------------
@pytest.mark.parametrize("arr,match", [
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    (np.full((32, 32, 3), np.nan), "uint8"),
    (np.zeros((3, 32, 32), np.uint8), "CHW"),
    (np.zeros((32, 32, 4), np.uint8), "3 channels"),
    (np.zeros((32, 32), np.uint8), "ndim=2"),
    (np.zeros((1, 32, 32, 3), np.uint8), "ndim=4"),
], ids=["float", "nan", "chw", "rgba", "2d", "4d"])
def test_row12_numpy_contract(classifier, arr, match):
    with pytest.raises(ValueError, match=match):
        classifier.classify(arr)


def test_row12_uint8_hwc_rgb_is_the_contract(classifier, banana_jpg):
    arr = np.asarray(load_image(banana_jpg))
    assert classifier.classify(arr).to_dict() == classifier.classify(Image.fromarray(arr)).to_dict()


# ---- row 13: paths ---------------------------------------------------------------------------------------
def test_row13_paths(classifier, banana_jpg, tmp_path):
    with pytest.raises(FileNotFoundError):
        classifier.classify(tmp_path / "missing.jpg")
    with pytest.raises(IsADirectoryError):
        classifier.classify(tmp_path)
    u = tmp_path / "bänänä 日本 ✓.jpg"
    u.write_bytes(banana_jpg.read_bytes())
    assert classifier.classify(u).to_dict() == classifier.classify(banana_jpg).to_dict()
    assert classifier.classify(str(u)).to_dict() == classifier.classify(banana_jpg).to_dict()


# ---- row 14: a batch with one bad item -------------------------------------------------------------------
def test_row14_batch_with_bad_items(classifier, banana_jpg, tmp_path):
    items = [banana_jpg, b"not an image", tmp_path / "missing.jpg", np.zeros((8, 8), np.uint8), banana_jpg]
    out = classifier.classify_batch(items, batch_size=2)
    assert [type(r).__name__ for r in out] == ["HierarchicalPrediction", "ItemError", "ItemError", "ItemError",
                                              "HierarchicalPrediction"]
    assert [r.index for r in out if isinstance(r, ItemError)] == [1, 2, 3]
    assert isinstance(out[1].error, InvalidImageError)
    assert isinstance(out[2].error, FileNotFoundError)
    assert isinstance(out[3].error, ValueError)
    assert "item 2" in str(out[2])
    single = classifier.classify(banana_jpg).to_dict()
    assert out[0].to_dict() == single and out[4].to_dict() == single


# ---- rows 14 + 17: NaN / Inf model output for one item ------------------------------------------------------
def test_row17_nan_or_inf_output_is_an_error_for_that_item_only(onnx_artifact_dir, fake_backend):
    clf = Classifier.load(onnx_artifact_dir, backend=fake_backend)
    gray = np.full((S, S, 3), 90, np.uint8)
    black = np.zeros((S, S, 3), np.uint8)  # the fake backend returns NaN for it
    white = np.full((S, S, 3), 255, np.uint8)  # ... and +Inf
    out = clf.classify_batch([gray, black, white, gray])
    assert isinstance(out[0], HierarchicalPrediction) and isinstance(out[3], HierarchicalPrediction)
    assert out[0].to_dict() == out[3].to_dict() == clf.classify(gray).to_dict()
    for i in (1, 2):
        assert isinstance(out[i], ItemError) and out[i].index == i
        assert isinstance(out[i].error, ModelOutputError)
        assert "NaN" in str(out[i].error)
    with pytest.raises(ModelOutputError):
        clf.classify(black)
    with pytest.raises(ModelOutputError):
        clf.classify(white, allow=["Packages"])


# ---- row 16: model files -----------------------------------------------------------------------------------
def _edit_manifest(d: Path, fn) -> None:
    p = d / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def test_row16_missing(model_copy, tmp_path):
    with pytest.raises(sdk.ModelNotFoundError, match="does not exist") as e:
        Classifier.load(tmp_path / "nowhere")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, sdk.HierfgError)
    assert not isinstance(e.value, ModelIntegrityError) and "demo/model" in str(e.value)
    (model_copy / "model.onnx").unlink()
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx.*missing"):
        Classifier.load(model_copy)
    (model_copy / "manifest.json").unlink()
    with pytest.raises(ModelIntegrityError, match="manifest"):
        Classifier.load(model_copy)


def test_row16_truncated(model_copy):
    f = model_copy / "model.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx.*size.*truncated"):
        Classifier.load(model_copy)


class _Recorder:
    constructed = 0

    def __init__(self, *a, **k):
        type(self).constructed += 1
        raise AssertionError("a runtime was asked to parse an unverified file")


def test_row16_wrong_sha256_checked_before_parsing(model_copy, monkeypatch):
    f = model_copy / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))
    monkeypatch.setitem(_BACKENDS._items, "onnx", _Recorder)
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx.*sha256"):
        Classifier.load(model_copy)
    assert _Recorder.constructed == 0


def test_row16_wrong_format(model_copy):
    f = model_copy / "model.onnx"
    f.write_bytes(b"PK\x03\x04 this is a zip, not an ONNX graph" * 100)
    _edit_manifest(model_copy, lambda m: m.update(sha256=sdk.sha256_file(f), size_bytes=f.stat().st_size))
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx.*could not load"):
        Classifier.load(model_copy)


def test_row16_label_count_differs_from_output_size(model_copy):
    def add_leaf(m):
        tax = Taxonomy.from_dict(m["taxonomy"])
        levels = [[sdk.Node(n.name, n.parent) for n in (tax.node(l, i) for i in range(s))]
                  for l, s in enumerate(tax.sizes)]
        levels[-1].append(sdk.Node("Extra-Leaf", 0))
        bigger = Taxonomy(list(tax.level_names), levels)
        m["taxonomy"], m["taxonomy_hash"] = bigger.to_dict(), bigger.hash
    _edit_manifest(model_copy, add_leaf)
    with pytest.raises(ModelIntegrityError, match=r"outputs have sizes \[3, 43, 81(, \d+)?\].*\[3, 43, 82(, \d+)?\]"):
        Classifier.load(model_copy)


def test_row16_taxonomy_hash_mismatch(model_copy):
    _edit_manifest(model_copy, lambda m: m.update(taxonomy_hash="0" * 64))
    with pytest.raises(ModelIntegrityError, match="manifest.json.*taxonomy hash mismatch"):
        Classifier.load(model_copy)


def test_row16_taxonomy_edited_without_its_hash(model_copy):
    def rename(m):
        m["taxonomy"]["levels"][2]["nodes"][0]["name"] = "Renamed"
    _edit_manifest(model_copy, rename)
    with pytest.raises(ModelIntegrityError, match="taxonomy"):
        Classifier.load(model_copy)


def test_row16_invalid_decoding_section(model_copy):
    _edit_manifest(model_copy, lambda m: m.update(decoding={"thresholds": [0.5, 2.0, 0.1]}))
    with pytest.raises(ModelIntegrityError, match="decoding"):
        Classifier.load(model_copy)


# ---- row 18: consistent paths, child <= parent ----------------------------------------------------------------
def _check_consistent(p: HierarchicalPrediction, tax: Taxonomy) -> None:
    for seq in (p.path, p.full_path):
        for a, b in zip(seq, seq[1:]):
            assert tax.parent(tax.level_names.index(b.level), b.index) == a.index
            assert b.probability <= a.probability + 1e-12
        for q in seq:
            assert 0.0 <= q.probability <= 1.0
    assert p.path == p.full_path[: len(p.path)]
    for items in p.top_k.values():
        probs = [s for _, s in items]
        assert probs == sorted(probs, reverse=True)


def test_row18_paths_are_consistent(classifier, grocery_root):
    from sdk import load_dataset
    ds = load_dataset(grocery_root, "val")
    imgs = [s.source for s in ds.samples[::25]]
    tax = classifier.taxonomy
    for kw in [{}, {"allow": ["Packages"]}, {"deny": ["Fruit", "coarse:Juice"]}, {"thresholds": [0.6, 0.4, 0.2]}]:
        for p in classifier.classify_batch(imgs, **kw):
            _check_consistent(p, tax)
    # and on random log-probs, the decoder alone
    rng = np.random.default_rng(0)
    dec = sdk.TreeDecoder(tax)
    lps = [np.log(rng.dirichlet(np.full(n, 0.3), size=64)) for n in tax.sizes]
    marg = dec.marginals(lps)
    for r in range(64):
        idx = dec.greedy_path(marg, r)
        for l in range(1, tax.depth):
            assert tax.parent(l, idx[l]) == idx[l - 1]
            assert marg[l][r, idx[l]] <= marg[l - 1][r, idx[l - 1]] + 1e-12


# ---- row 19: blank, noise, out-of-catalogue ---------------------------------------------------------------------
def test_row19_out_of_catalogue_never_a_confident_sku(model_copy, grocery_root):
    from sdk import _calibrate as C
    from sdk import load_dataset

    clf = Classifier.load(model_copy)
    ds = load_dataset(grocery_root, "val", taxonomy=clf.taxonomy)
    ds = ds.subset(range(0, len(ds), 3))
    calib_ood = C.out_of_catalogue_images(3, seed=0)
    cal = C.calibrate(clf, C.batch_logprobs(clf, [s.source for s in ds.samples]), ds.labels(),
                      C.batch_logprobs(clf, [i for _, i in calib_ood]), [k for k, _ in calib_ood], 0.98)
    C.write_decoding(model_copy, cal.decoding(0.98, 0.05, "test", clf.taxonomy.level_names))
    clf = Classifier.load(model_copy)
    fresh = [img for _, img in C.out_of_catalogue_images(2, seed=123)]  # not the calibration images
    fresh += [np.zeros((300, 200, 3), np.uint8), np.full((50, 50, 3), 255, np.uint8)]
    for p in clf.classify_batch(fresh):
        assert isinstance(p, HierarchicalPrediction)  # no crash
        assert p.is_unknown or not p.is_complete, p.breadcrumb()  # back-off or unknown, never a SKU


# ---- row 20: exported fp32 matches PyTorch on real images -----------------------------------------------------------
def test_row20_onnx_fp32_matches_pytorch_through_the_sdk(classifier, tiny_student_dir, grocery_root):
    from converters._common import torch_logprobs
    from train.checkpoint import load_model
    from sdk import load_dataset
    from train.models import DeployWrapper

    model, cfg, tax, _ = load_model(tiny_student_dir)
    ds = load_dataset(grocery_root, "val", taxonomy=tax)
    imgs = np.stack([classifier.preprocess(s.source) for s in ds.samples[::37]])
    ref = torch_logprobs(DeployWrapper(model).eval(), imgs)
    got = classifier.logprobs(imgs)
    for r, g in zip(ref, got):
        assert np.abs(np.clip(r, -30, 0) - np.clip(g, -30, 0)).max() < 1e-3
    dec = sdk.TreeDecoder(tax)
    assert (dec.paths(ref) == dec.paths(got)).all()
