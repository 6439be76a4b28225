"""`sprintrt serve --write-config` and the CLI's refusals (no Ray started)."""

from __future__ import annotations

import subprocess
import sys

import pytest

yaml = pytest.importorskip("yaml")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sprintrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_write_config_for_a_cluster(engine_dir, tmp_path):
    out = tmp_path / "serve.yaml"
    r = _cli("serve", engine_dir, "--replicas", 2, "--num-gpus", 1, "--max-batch", 4, "--write-config", out)
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(out.read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "sprintrt.serving.app:build_app"
    assert app["args"]["engine_dir"] == str(engine_dir) and app["args"]["max_batch"] == 4
    (dep,) = app["deployments"]
    assert dep["num_replicas"] == 2 and dep["ray_actor_options"]["num_gpus"] == 1


@pytest.mark.parametrize("args,match", [
    (["--max-batch", "0"], "max_batch=0"),
    (["--max-queued", "0"], "max_queued=0"),
    (["--timeout-s", "0"], "timeout_s=0"),
])
def test_bad_serve_options_are_typed_errors(engine_dir, tmp_path, args, match):
    r = _cli("serve", engine_dir, *args, "--write-config", tmp_path / "x.yaml")
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_serve_needs_an_engine_directory(tmp_path):
    r = _cli("serve", tmp_path / "nope", "--write-config", tmp_path / "x.yaml")
    assert r.returncode == 2 and "manifest.json" in r.stderr and "sprintrt build" in r.stderr


def test_loadtest_refuses_a_non_url(tmp_path):
    r = _cli("loadtest", "localhost:8000", "-o", tmp_path / "l.json")
    assert r.returncode == 2 and "url='localhost:8000'" in r.stderr
