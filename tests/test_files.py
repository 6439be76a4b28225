"""sprintrt/files.py: the size + hash check, and the tuner's one hash per unchanged file."""

import os

import sprintrt.files as F


def _counting(monkeypatch) -> list:
    calls = []
    real = F.sha256_file
    monkeypatch.setattr(F, "sha256_file", lambda path, h=None: calls.append(path) or real(path, h))
    return calls


def test_a_file_is_hashed_once_inside_hashes_remembered_and_a_replaced_one_again(tmp_path, monkeypatch):
    path = tmp_path / "graph.onnx"
    path.write_bytes(b"a" * 1000)
    digest = F.sha256_file(path)
    calls = _counting(monkeypatch)
    with F.hashes_remembered():
        assert F.file_mismatch(path, 1000, digest) is None
        assert F.file_mismatch(path, 1000, digest) is None
        with F.hashes_remembered():  # nested: the same memory
            assert F.file_mismatch(path, 1000, digest) is None
        assert len(calls) == 1
        # replaced as sprintrt's writers replace files (same size, other bytes, a new file renamed over it)
        new = tmp_path / "new.onnx"
        new.write_bytes(b"b" * 1000)
        os.replace(new, path)
        assert "does not match its sha256" in F.file_mismatch(path, 1000, digest)
        # changed in place, same size: its modification time moves
        path.write_bytes(b"a" * 1000)
        os.utime(path, ns=(1, 1))
        assert F.file_mismatch(path, 1000, digest) is None
        assert len(calls) == 3
    assert F.file_mismatch(path, 1000, digest) is None  # outside the block every check hashes
    assert F.file_mismatch(path, 1000, digest) is None
    assert len(calls) == 5
