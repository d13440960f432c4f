"""torchrun with two CPU processes on gloo: a few steps, then both ranks hold identical weights."""

import json
import socket
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_end_with_identical_weights(tmp_path, grocery_root):
    out = tmp_path / "ddp"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "train", "teacher", "--data", str(grocery_root), "--out", str(out), "--epochs", "1",
           "--backbone", "efficientnet_lite0", "--taps", "10,-1", "--tap-pool", "1,1", "--freeze-blocks", "11",
           "--image-size", "96", "--d-model", "32", "--heads", "2", "--query-layers", "1", "--fusion-layers", "1",
           "--limit-per-class", "1", "--limit-val", "8", "--cache-views", "1", "--batch-size", "8",
           "--holdout-fraction", "0", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    conf = json.loads((out / "config.json").read_text())
    sync = conf["distributed"]
    assert sync["world_size"] == 2 and sync["backend"] == "gloo"
    digests = sync["weight_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # the run really trained: 81 images over 2 ranks at batch 8 -> 6 steps per rank
    assert conf["history"][0]["loss"] > 0
