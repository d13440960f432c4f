"""kill -9 in the middle of training, then --resume: no finished epoch lost or repeated."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.slow
def test_kill_then_resume_loses_and_repeats_no_epoch(tmp_path, grocery_root):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "student", "--data", str(grocery_root), "--out", str(out),
           "--epochs", "3", "--image-size", "96", "--limit-per-class", "2", "--limit-val", "16",
           "--cache-views", "1", "--d-model", "32", "--heads", "2", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoint" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["epoch"] >= 0:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(latest.read_text())["epoch"]
    assert done < 2
    subprocess.run(cmd + ["--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hist = json.loads((out / "config.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert (out / "model.safetensors").is_file()
