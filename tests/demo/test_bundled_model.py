"""`python -m demo` out of the box: the bundled int8 model serves a real grocery photo correctly."""

import json
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from demo.app import DEFAULT_MODEL
from sdk import Classifier, Manifest


def test_bundled_model_is_int8_small_and_calibrated():
    m = Manifest.load(DEFAULT_MODEL)
    assert m.precision == "int8" and m.size_bytes <= 8 * 1024 * 1024
    assert len(m.decoding["thresholds"]) == 3 and "unknown_threshold" in m.decoding
    Classifier.load(DEFAULT_MODEL)  # sha256 verified


@pytest.mark.slow
def test_python_m_demo_serves_bundled_model_and_classifies_real_photo(tmp_path, grocery_root):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "demo", "--port", str(port), "--data-dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                page = urllib.request.urlopen(url + "/", timeout=2).read().decode()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(proc.stderr.read().decode()[-2000:])
                time.sleep(0.2)
        assert "<html" in page.lower()
        photo = (grocery_root / "val/Fruit/Banana/Banana_005.jpg").read_bytes()
        b = uuid.uuid4().hex
        body = (f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{b}--\r\n".encode()
        req = urllib.request.Request(url + "/api/scans", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={b}"})
        res = json.loads(urllib.request.urlopen(req, timeout=60).read())
        text = json.dumps(res)
        assert "Banana" in text and "Fruit" in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
