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


def test_the_cli_writes_no_default_of_its_own():
    """Every default comes from the library (option dataclasses, the pipeline's call signature, defaults.py): an
    `add_argument(..., default=<literal>)` in cli.py would be a second copy that can drift from it."""
    import ast
    from pathlib import Path

    import sprintrt.cli

    tree = ast.parse(Path(sprintrt.cli.__file__).read_text())
    literals = [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
                for kw in node.keywords if kw.arg == "default"
                and isinstance(kw.value, ast.Constant) and kw.value.value is not None]
    assert not literals, literals


def test_cli_defaults_follow_the_library():
    from sprintrt.benchmarks.config import BenchConfig
    from sprintrt.cli import build_parser
    from sprintrt.serving.app import ServeOptions
    from sprintrt.serving.loadtest import LoadConfig

    p = build_parser()
    serve = p.parse_args(["serve", "e"])
    assert (serve.max_batch, serve.max_wait_ms, serve.max_queued, serve.timeout_s) == tuple(
        getattr(ServeOptions("e"), f) for f in ("max_batch", "max_wait_ms", "max_queued", "timeout_s"))
    assert serve.host == "127.0.0.1"  # loopback unless asked
    load = p.parse_args(["loadtest", "http://x"])
    assert (load.concurrency, load.requests, load.size) == (LoadConfig("u").concurrency, LoadConfig("u").requests,
                                                            LoadConfig("u").size)
    bench = p.parse_args(["bench"])
    assert (bench.runs, bench.warmup, bench.arch) == (BenchConfig().runs, BenchConfig().warmup, BenchConfig().arch)
    gen = p.parse_args(["generate", "e", "--prompt", "x", "-o", "x.png"])
    assert (gen.steps, gen.height, gen.guidance_scale) == (2, 1024, 4.5)  # diffusers' SanaSprintPipeline defaults
