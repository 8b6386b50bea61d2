"""tests/bench_speed.py: --compare finds equal outputs equal and flags a changed one; --profile reports a consistent
convolution share (smoke networks, CPU; the timings themselves are not asserted)."""
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def compare(folder, tmp_path) -> tuple[int, list[list[str]]]:
    """Run `bench_speed.py --compare FOLDER --only kdsr --tiny`; (exit status, table rows split into cells)."""
    out = tmp_path / "compare.md"
    run = subprocess.run([sys.executable, str(REPO / "tests" / "bench_speed.py"), "--compare", str(folder), "--only",
                          "kdsr", "--tiny", "--repeats", "1", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert out.exists(), run.stderr[-2000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| kdsr")]
    return run.returncode, rows


def copy_of_the_scripts(tmp_path):
    """The checkout's top-level *.py in a folder: a revision for --compare on a machine without the git history."""
    old = tmp_path / "old"
    old.mkdir()
    for path in REPO.glob("*.py"):
        shutil.copy(path, old / path.name)
    return old


def test_compare_against_a_folder_copy_of_the_scripts_is_exact(tmp_path):
    old = copy_of_the_scripts(tmp_path)
    status, rows = compare(old, tmp_path)
    assert status == 0 and len(rows) == 3                       # teacher and student train steps, student inference
    for row in rows:                                            # ... | max abs Δ out | rel Δ out | rel Δ grad | tol | check
        assert row[-1] == "ok" and row[-5] == "0" and row[-4] == "0" and row[-3] in ("0", ""), row


def test_compare_flags_a_revision_whose_output_differs(tmp_path):
    old = copy_of_the_scripts(tmp_path)
    with open(old / "kdsr.py", "a") as f:              # that revision's dynamic conv doubles its output
        f.write("\n_dynamic_depthwise = dynamic_depthwise\n"
                "def dynamic_depthwise(*args, **kwargs):\n    return 2 * _dynamic_depthwise(*args, **kwargs)\n")
    status, rows = compare(old, tmp_path)
    assert status == 1 and len(rows) == 3
    assert all(row[-1].startswith("DIFFERS") and float(row[-4]) > 1e-4 for row in rows), rows


def test_profile_reports_the_convolution_share_and_its_bound(tmp_path):
    out = tmp_path / "profile.md"
    subprocess.run([sys.executable, str(REPO / "tests" / "bench_speed.py"), "--profile", "--only", "pdm_sr", "--tiny",
                    "--threads", "1", "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| pdm_sr")]
    assert [row[2] for row in rows] == ["train step", "inference 180x320"]
    for row in rows:                                 # ... | ms | conv share | largest other op | bound
        share = float(row[-3].rstrip(" %"))
        assert 0 < share <= 100 and float(row[-1]) == pytest.approx(100 / share, rel=0.02), row
        assert "conv" not in row[-2] and float(row[-4]) > 0
