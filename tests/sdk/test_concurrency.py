"""RELIABILITY.md row 15: one `Classifier` used from 8 threads x 1,000 calls (200 where the Classifier
serializes a runtime that is not thread-safe) gives exactly the serial answers.

Parametrized over every target; a backend whose runtime or converter is not importable here is skipped
with the reason. Each exported target is the shared `all_exports` artifact (tests/conftest.py) of the same
tiny student as the ONNX fixture.
"""

from __future__ import annotations

import importlib
import threading

import numpy as np
import pytest

import sdk._backends as sdk_backends
from sdk import Classifier, available_backends
from sdk._backends import OnnxRuntimeBackend, register_backend

THREADS, CALLS = 8, 1000
LOCKED = "test-onnx-locked"

if LOCKED not in available_backends():
    @register_backend(LOCKED)
    class _LockedOnnx(OnnxRuntimeBackend):
        """ONNX Runtime declared not thread-safe, to exercise the Classifier's LockedBackend path."""
        thread_safe = False


def _artifact(target, onnx_artifact_dir, all_exports_factory):
    if target in ("onnx", LOCKED):
        return onnx_artifact_dir
    if target not in available_backends():
        pytest.skip(f"no {target!r} backend registered in sdk._backends")
    try:
        importlib.import_module(f"converters.{target}")
    except ImportError as e:
        pytest.skip(f"the {target} converter is not importable here: {e}")
    return all_exports_factory() / target


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", LOCKED, "tflite", "executorch", "coreml"])
def test_threads_give_the_serial_answers(target, onnx_artifact_dir, grocery_root, request):
    from sdk import load_dataset

    # the `python -m converters all` artifacts the converter tests share, built only if a target needs them
    directory = _artifact(target, onnx_artifact_dir, lambda: request.getfixturevalue("all_exports"))
    unavailable = getattr(sdk_backends, "BackendUnavailableError", ())
    try:
        clf = Classifier.load(directory, backend=target if target == LOCKED else None)
    except unavailable as e:  # e.g. Core ML prediction needs macOS
        pytest.skip(f"{target} artifacts cannot run on this machine: {e}")
    ds = load_dataset(grocery_root, "val", taxonomy=clf.taxonomy)
    # decoded once: the threads exercise the runtime and decoding, not JPEG decoding
    images = [clf.preprocess(s.source) for s in ds.samples[::37][:THREADS]]
    # a runtime the Classifier serializes (TFLite, ExecuTorch, the locked ONNX variant) needs only enough calls
    # to contend for its lock while decoding runs concurrently; a thread-safe runtime takes all calls at once
    serialized = isinstance(clf._backend, sdk_backends.LockedBackend)
    assert serialized == (target not in ("onnx",))
    calls = CALLS // 5 if serialized else CALLS
    options = [{}, {"allow": ["Packages"]}, {"thresholds": [0.5, 0.3, 0.2]}]
    serial = {(i, j): clf.classify(img, **opt).to_dict() for i, img in enumerate(images)
              for j, opt in enumerate(options)}
    assert len({str(v) for v in serial.values()}) > len(images)  # the inputs really differ

    mismatches: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    done = [0] * THREADS
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        try:
            start.wait()
            for k in range(calls):
                i, j = (t + k) % len(images), k % len(options)
                if clf.classify(images[i], **options[j]).to_dict() != serial[(i, j)]:
                    mismatches.append((t, k))
                done[t] += 1
        except BaseException as e:  # surfaced below; a thread must not die silently
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert sum(done) == THREADS * calls
    assert not mismatches, f"{len(mismatches)} answers differ from serial, first: {mismatches[:5]}"
