"""Recording what a pipeline's engines are fed (and give back), for calibration, tuning and drift.

`with recording(pipe, components) as calls:` swaps each component's engine for a recorder that keeps a
copy of every call's inputs (and outputs, with `outputs=True`) and puts the engines back when the block
ends, however it ends.
"""

from __future__ import annotations

import contextlib


class EngineCalls:
    """Wraps an engine; keeps a copy of each call's inputs and, if asked, its outputs."""

    def __init__(self, engine, outputs: bool = False):
        self.engine, self.outputs = engine, outputs
        self.calls: list[tuple[dict, dict | None]] = []

    def __call__(self, **feeds):
        out = self.engine(**feeds)
        self.calls.append(({k: v.copy() for k, v in feeds.items()},
                           {k: v.copy() for k, v in out.items()} if self.outputs else None))
        return out

    @property
    def feeds(self) -> list[dict]:
        """Every call's inputs, in call order."""
        return [feeds for feeds, _ in self.calls]


@contextlib.contextmanager
def recording(pipe, components, outputs: bool = False):
    """Yields {component: EngineCalls} while `pipe` runs through the recorders."""
    recorders = {c: EngineCalls(pipe.engine(c), outputs) for c in components}
    for c, recorder in recorders.items():
        pipe.set_engine(c, recorder)
    try:
        yield recorders
    finally:
        for c, recorder in recorders.items():
            pipe.set_engine(c, recorder.engine)
