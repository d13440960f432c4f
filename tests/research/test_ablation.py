"""research/ablation.py: finished rows are reused, and the table's comparisons come from the rows' own metrics."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "research/ablation.py")


def _row(src: Path, dst: Path, fine: float, severity: float, consistency: float) -> None:
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    for m in conf["metrics"].values():
        m.update({"top1/fine": fine, "mistake_severity": severity, "consistency": consistency})
    (dst / "config.json").write_text(json.dumps(conf))


def test_finished_rows_are_reused_and_compared(tiny_student_dir, grocery_root, tmp_path):
    assert (tiny_student_dir / "metrics.json").is_file()  # what marks a row finished
    out = tmp_path / "ablation"
    _row(tiny_student_dir, out / "flat", fine=0.50, severity=1.75, consistency=1.0)
    _row(tiny_student_dir, out / "hsq_no_camp", fine=0.60, severity=1.50, consistency=0.80)
    _row(tiny_student_dir, out / "hsq_full", fine=0.625, severity=1.625, consistency=0.875)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    r = subprocess.run([sys.executable, SCRIPT, "--data", str(grocery_root), "--out", str(out),
                        "--rows", "flat,hsq_no_camp,hsq_full"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "== " not in r.stdout  # nothing retrained
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == before
    res = json.loads((out / "ablation.json").read_text())
    assert list(res["rows"]) == ["flat", "hsq_no_camp", "hsq_full"]
    splits = set(res["rows"]["flat"]["metrics"])
    got = {(c["comparison"], c["split"]): (round(c["delta"], 6), c["better"]) for c in res["comparisons"]}
    for split in splits:
        assert got[("HSQ-FT full vs flat: fine top-1", split)] == (0.125, True)
        assert got[("HSQ-FT full vs flat: mistake severity", split)] == (-0.125, True)  # lower is better
        assert got[("CAMP (full vs without): consistency", split)] == (0.075, True)
        assert got[("CAMP (full vs without): mistake severity", split)] == (0.125, False)
    assert not any("relabel" in c or "HRN" in c for c, _ in got)  # rows not run are not compared
    md = (out / "ablation.md").read_text()
    assert "| CAMP (full vs without): mistake severity | val | +0.125 | worse |" in md
    assert "| hsq_full | val | " in md and "| 0.625 |" in md


def test_unknown_row_is_refused_before_any_training(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--rows", "flat,hsq_nocamp"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "hsq_nocamp" in r.stderr and "hsq_no_camp" in r.stderr
    assert not (tmp_path / "o").exists()
