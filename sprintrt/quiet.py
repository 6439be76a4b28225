"""Silence third-party progress bars and warnings that would bury sprintrt's own output (the CLI, and
the benchmark's per-system worker processes, which start without the CLI's settings)."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """Silence third-party progress bars and warnings that would bury our own output."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
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
