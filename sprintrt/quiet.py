"""Keep third-party progress bars, warnings and tables from burying sprintrt's own output (the CLI, and the
benchmark's per-system worker processes, which start without the CLI's settings). sprintrt's own Notices
(sprintrt/errors.py) are never hidden."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

from sprintrt.errors import Notice


def quiet_libraries(verbose: bool = False) -> None:
    """Silence third-party progress bars and warnings that would bury our own output; sprintrt's Notices stay.
    verbose: leave the libraries' warnings and logs as they are (run commands put them on stderr)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    import logging

    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=Notice)  # inserted first, so it wins over "ignore"
    logging.getLogger("torch").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to file descriptor 1 in this block to stderr, and yield a text stream on the
    real stdout. Libraries print to stdout from Python (Polygraphy's `[W]` lines), from handlers that
    captured sys.stdout at import (NNCF's tables) and from C++ (TensorRT, OpenVINO): only a redirect of the
    descriptor itself catches all of them, so stdout keeps sprintrt's own lines (paths, tables) for scripts.
    Where stdout has no descriptor (an embedding host), nothing is redirected."""
    try:
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):
        yield sys.stdout
        return
    real = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(sys.stdout, "encoding", None) or "utf-8")
    try:
        os.dup2(err, fd)
        yield real
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        real.close()
        os.dup2(saved, fd)
        os.close(saved)
