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
    assert "generated at 1152x896 (resolution binning" in r.stdout  # what binning costs is said


def test_binning_note_names_the_size_generated_and_the_way_out():
    from sprintrt.cli import binning_note

    note = binning_note(512, 512, 32)
    assert "generated at 1024x1024" in note and "--no-binning generates 512x512 itself, 4.0x fewer pixels" in note
    assert "--no-binning" not in binning_note(200, 150, 32)  # a size --no-binning refuses is not suggested
    assert binning_note(1024, 1024, 32) == ""  # a bin size: nothing to say


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
