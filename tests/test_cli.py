"""The sprintrt command: outputs where it says, typed errors as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image


def _run(*args, **kw):
    argv = [a if isinstance(a, bytes) else str(a) for a in args]  # bytes: an argument that is not UTF-8
    return subprocess.run([sys.executable, "-m", "sprintrt.cli", *argv], capture_output=True, text=True, timeout=300,
                          **kw)


def _one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


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


# ---- hardening ------------------------------------------------------------------------------------------

def test_generate_refuses_a_huge_binned_size(engine_dir, tmp_path):
    """It used to bin 99999² to 1024², generate, then die allocating 112 GiB to resize back."""
    r = _run("generate", engine_dir, "--prompt", "x", "-o", tmp_path / "x.png", "--height", "99999", "--width", "99999")
    _one_line_error(r, "height=99999", "[1, 4096]")
    assert not (tmp_path / "x.png").exists()


def test_binning_note_is_right_at_every_size():
    from sprintrt.cli import binning_note

    upscaled = binning_note(2048, 2048, 32)
    assert "generated at 1024x1024" in upscaled and "4.0x more pixels to decode, none of them upscaled" in upscaled
    assert "about as many pixels" in binning_note(1024, 992, 32)
    assert "--no-binning" not in binning_note(512, 512, 32, direct=False)  # outside the engines' profile
    assert "--no-binning" not in binning_note(4096, 100, 32) and "resized to 4096x100" in binning_note(4096, 100, 32)
    for h in (1, 31, 64, 333, 1024, 2048, 4096):
        for w in (1, 77, 1024, 4096):
            note = binning_note(h, w, 32)
            assert note == "" or note.startswith("note: generated at") and f"resized to {h}x{w}" in note


def test_generate_checks_the_output_path_before_any_work(tmp_path):
    """A directory or a non-image name failed with a traceback after generating; now it fails first (the engine
    directory here does not even exist, and the output is what the error names)."""
    missing = tmp_path / "no-engines"
    _one_line_error(_run("generate", missing, "--prompt", "x", "-o", tmp_path), "not a directory")
    _one_line_error(_run("generate", missing, "--prompt", "x", "-o", tmp_path / "x.txt"), "x.txt", ".png")
    (tmp_path / "file").write_text("")
    _one_line_error(_run("generate", missing, "--prompt", "x", "-o", tmp_path / "file" / "x.png"), "is a file")
    # then the engines: a good output path gets as far as the engine directory
    _one_line_error(_run("generate", missing, "--prompt", "x", "-o", tmp_path / "new" / "x.webp"), "sprintrt build")
    assert not (tmp_path / "new").exists()


def test_a_full_disk_leaves_the_previous_image_whole(engine_dir, tmp_path):
    """ulimit -f: the PNG write fails with EFBIG; the good image that was there stays, and no temp file is left."""
    import resource
    import signal

    out = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(out)
    good = out.read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited: the write gets EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = _run("generate", engine_dir, "--prompt", "a cat", "-o", out, "--steps", "1", "--height", "128", "--width",
             "128", "--no-binning", preexec_fn=small_files)
    _one_line_error(r, f"cannot write {out}", "File too large", "unchanged")
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_generate_verifies_engine_hashes_unless_told_not_to(copy_engine_dir, tmp_path):
    """A same-size edit of an engine file ran and gave a wrong image with exit 0."""
    import json

    m = json.loads((copy_engine_dir / "manifest.json").read_text())
    path = copy_engine_dir / m["components"]["transformer"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    args = ("generate", copy_engine_dir, "--prompt", "a cat", "--steps", "1", "--height", "64", "--width", "64",
            "--no-binning")
    _one_line_error(_run(*args, "-o", tmp_path / "a.png"), "sha256", "--rebuild")
    r = _run(*args, "-o", tmp_path / "b.png", "--no-verify")
    assert "sha256" not in r.stderr and "Traceback" not in r.stderr


def test_no_verify_states_its_cost():
    from sprintrt.cli import build_parser

    p = build_parser()
    gen = p.parse_args(["generate", "e", "--prompt", "x", "-o", "x.png"])
    assert gen.no_verify is False and p.parse_args(["generate", "e", "--prompt", "x", "-o", "x.png",
                                                    "--no-verify"]).no_verify
    from sprintrt.cli import VERIFY_HELP

    assert "s per GB" in VERIFY_HELP


def test_serve_flags_reach_serve_options(monkeypatch):
    import sprintrt.serving.app as app
    from sprintrt.cli import build_parser, cmd_serve

    seen = {}
    p = build_parser()  # before run is replaced: its signature gives --host and --port their defaults
    monkeypatch.setattr(app, "run", lambda options, **kw: seen.update(options=options, **kw))
    defaults = p.parse_args(["serve", "e"])
    cmd_serve(defaults)
    fields = ("max_pixels_per_request", "max_steps", "max_prompt_bytes", "drain_timeout_s", "verify_sha256")
    assert [getattr(seen["options"], f) for f in fields] == [getattr(app.ServeOptions("e"), f) for f in fields]
    assert (seen["host"], seen["port"], seen["address"]) == (defaults.host, defaults.port, defaults.address)
    cmd_serve(p.parse_args(["serve", "e", "--max-pixels-per-request", "65536", "--max-steps", "3",
                            "--max-prompt-bytes", "100", "--drain-timeout-s", "2.5", "--no-verify"]))
    assert [getattr(seen["options"], f) for f in fields] == [65536, 3, 100, 2.5, False]


def test_generate_refuses_a_prompt_that_is_not_utf8(engine_dir, tmp_path):
    r = _run("generate", engine_dir, "--prompt", b"a \xff cat", "-o", tmp_path / "x.png")  # argv as raw bytes
    _one_line_error(r, "prompt is not valid UTF-8")


def test_a_cut_prompt_is_noted_once_on_stderr(engine_dir, tmp_path):
    r = _run("generate", engine_dir, "--prompt", "a cat " * 400, "-o", tmp_path / "x.png", "--steps", "1",
             "--height", "64", "--width", "64", "--no-binning")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "max_sequence_length=300" in line]
    assert len(notes) == 1 and notes[0].startswith("sprintrt generate: note: prompt[0] has"), r.stderr
    assert "max_sequence_length" not in r.stdout


def test_threads_out_of_range_are_refused(tmp_path):
    for n in ("0", "1000"):
        _one_line_error(_run("generate", tmp_path, "--prompt", "x", "-o", tmp_path / "x.png", "--threads", n),
                        f"threads={n}", "[1, ")


def test_image_that_is_a_directory(tmp_path):
    _one_line_error(_run("generate", tmp_path, "--prompt", "x", "-o", tmp_path / "x.png", "--image", tmp_path),
                    "is a directory")


def test_malformed_export_info_is_a_typed_error(tmp_path):
    (tmp_path / "export_info.json").write_text("[]")
    _one_line_error(_run("build", tmp_path, "-o", tmp_path / "e"), "export_info.json", "JSON list")
    (tmp_path / "export_info.json").write_text("{bad")
    _one_line_error(_run("build", tmp_path, "-o", tmp_path / "e"), "export_info.json", "cannot be read")


def test_export_of_a_missing_local_path_says_it_does_not_exist(tmp_path):
    """`/nonexistent` was taken for a hub id and the error said the hub could not be reached."""
    from sprintrt.export.onnx_export import _missing_local_path

    (tmp_path / "models").mkdir()
    for model in ("/nonexistent", "./missing", "models/missing"):
        r = _run("export", model, "-o", tmp_path / "onnx", cwd=tmp_path)
        _one_line_error(r, f"model={model!r} does not exist")
        assert "download" not in r.stderr and "hub:" not in r.stderr
    assert _missing_local_path("~/surely-missing-sprintrt-ckpt") and _missing_local_path("not a hub id")
    assert _missing_local_path("Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers") is None  # a hub id


def test_build_says_reused_shows_progress_and_keeps_stdout_to_its_own_lines(onnx_dir, tmp_path):
    out = tmp_path / "engines"
    first = _run("build", onnx_dir, "-o", out)
    assert first.returncode == 0, first.stderr
    assert "(6 built, 0 reused)" in first.stdout and "written to" in first.stdout
    # stdout is a pipe here: progress lines with the elapsed time, on stderr
    assert any(line.startswith("[") and " s] " in line and "building" in line for line in first.stderr.splitlines())
    again = _run("build", onnx_dir, "-o", out)
    assert again.returncode == 0, again.stderr
    assert "reused: all up to date, none built" in again.stdout and "written" not in again.stdout
    assert all(line.startswith(("  ", "engines")) for line in first.stdout.splitlines() + again.stdout.splitlines())
    rebuilt = _run("build", onnx_dir, "-o", out, "--rebuild")  # same keys, same file names: still built anew
    assert rebuilt.returncode == 0 and "(6 built, 0 reused)" in rebuilt.stdout, rebuilt.stdout + rebuilt.stderr


def test_library_output_goes_to_stderr_not_stdout():
    """Polygraphy prints its [W] lines to stdout from Python, NNCF's handler holds the stdout it saw at import,
    C++ libraries write to descriptor 1: the CLI's stages send all of them to stderr."""
    code = ("import os, sys, logging\n"
            "held = logging.StreamHandler(sys.stdout)\n"
            "from sprintrt.quiet import stdout_to_stderr\n"
            "from polygraphy.logger import G_LOGGER\n"
            "with stdout_to_stderr():\n"
            "    G_LOGGER.warning('polygraphy says')\n"
            "    held.emit(logging.makeLogRecord({'msg': 'a held handler says'})); held.flush()\n"
            "    print('python says')\n"
            "    os.write(1, b'C++ says\\n')\n"
            "print('sprintrt says')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "sprintrt says\n"
    for what in ("polygraphy says", "a held handler says", "python says", "C++ says"):
        assert what in r.stderr


def test_every_subcommand_takes_verbose():
    from sprintrt.cli import build_parser

    p = build_parser()
    assert p.parse_args(["export", "m", "-o", "x", "--verbose"]).verbose
    assert p.parse_args(["build", "o", "-o", "e"]).verbose is False


def test_generate_follows_a_control_image_and_refuses_controlnet_flags_alone(engine_dir, tmp_path):
    import numpy as np
    from PIL import ImageDraw

    scribble = Image.new("RGB", (128, 128))
    ImageDraw.Draw(scribble).line((10, 10, 110, 110), fill=(255, 255, 255), width=5)
    scribble.save(tmp_path / "scribble.png")
    outs = {}
    for scale in ("1.0", "0"):
        outs[scale] = tmp_path / f"cabin-{scale}.png"
        r = _run("generate", engine_dir, "--prompt", "a cabin", "-o", outs[scale], "--steps", "1", "--height", "128",
                 "--width", "96", "--no-binning", "--control-image", tmp_path / "scribble.png", "--controlnet-scale",
                 scale)
        assert r.returncode == 0, r.stderr
        assert Image.open(outs[scale]).size == (96, 128)
    plain = tmp_path / "plain.png"
    assert _run("generate", engine_dir, "--prompt", "a cabin", "-o", plain, "--steps", "1", "--height", "128",
                "--width", "96", "--no-binning").returncode == 0
    # Scale 0 is text to image; scale 1 follows the scribble.
    assert np.array_equal(np.asarray(Image.open(outs["0"])), np.asarray(Image.open(plain)))
    assert not np.array_equal(np.asarray(Image.open(outs["1.0"])), np.asarray(Image.open(plain)))
    _one_line_error(_run("generate", engine_dir, "--prompt", "x", "-o", tmp_path / "x.png", "--controlnet-scale", "1"),
                    "--controlnet-scale is for ControlNet")
    _one_line_error(_run("generate", engine_dir, "--prompt", "x", "-o", tmp_path / "x.png", "--control-image",
                         tmp_path / "missing.png"), "control_image=", "does not exist")
    _one_line_error(_run("generate", engine_dir, "--prompt", "x", "-o", tmp_path / "x.png", "--control-image",
                         tmp_path / "scribble.png", "--controlnet-scale", "high"), "--controlnet-scale='high'")
