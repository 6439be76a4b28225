"""The sprintrt command: outputs where it says, typed errors as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sprintrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_generate_writes_png(engine_dir, tmp_path):
    out = tmp_path / "img" / "cat.png"
    r = _run("generate", engine_dir, "--prompt", "a cat", "-o", out, "--steps", "1", "--height", "200",
             "--width", "150", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    assert Image.open(out).size == (150, 200)


def test_errors_are_one_line_without_traceback(tmp_path):
    r = _run("build", tmp_path / "missing", "-o", tmp_path / "e")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("sprintrt build: error:") and "sprintrt export" in r.stderr
    assert not (tmp_path / "e").exists()
    r = _run("generate", tmp_path / "missing", "--prompt", "x", "-o", tmp_path / "x.png")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "sprintrt build" in r.stderr


def test_generate_rejects_bad_size(engine_dir, tmp_path):
    r = _run("generate", engine_dir, "--prompt", "a cat", "-o", tmp_path / "x.png", "--no-binning", "--height", "100")
    assert r.returncode == 2 and "height=100" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()
