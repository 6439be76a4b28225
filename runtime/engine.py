"""The run-side contract every engine backend satisfies (Polygraphy's BaseRunner is the model).

`Engine` owns what all backends share: the component's name and spec, the engine's profile limits
(from the manifest), the input check, the output order, release and the context manager. A backend
subclass supplies only `_infer(feeds) -> list of outputs` and, if it holds resources, `_release()`.
Lifecycle: construct (load) → call any number of times (infer) → release (or leave a `with` block).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sprintrt.engines.manifest import Manifest
from sprintrt.errors import EngineDirError
from sprintrt.export import specs as S


def profile_limits(manifest: Manifest, component: str) -> dict[str, S.Bounds]:
    """The engine's dim ranges as built (its shape profile), from the manifest."""
    dims = manifest.components[component]["io"]["dims"]
    return {name: S.Bounds(d["min"], d["opt"], d["max"]) for name, d in dims.items()}


def component_spec(manifest: Manifest, component: str) -> S.ComponentSpec:
    return S.SPEC_BUILDERS[component](S.ModelDims.from_json(manifest.data["model_dims"]))


class Engine:
    """One loaded engine of one component: `engine(**feeds) -> {output name: array}`."""

    def __init__(self, manifest: Manifest, component: str):
        self.name = component
        self.spec = component_spec(manifest, component)
        self.limits: dict[str, S.Bounds] = profile_limits(manifest, component)
        self.backend: str = manifest.components[component]["backend"]
        self.output_names = [t.name for t in self.spec.outputs]
        self._released = False

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if self._released:
            raise EngineDirError(f"the {self.name} engine was released. Fix: load the engines again "
                                 "(SprintPipeline.from_engines)")
        self.spec.check_feeds(feeds, self.limits)
        outs = self._infer({t.name: feeds[t.name] for t in self.spec.inputs})
        return dict(zip(self.output_names, outs))

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the engine on checked feeds; outputs in spec order, owned by the caller."""
        raise NotImplementedError

    def release(self) -> None:
        """Free the engine's resources; calling it again does nothing."""
        if not self._released:
            self._release()
            self._released = True

    def _release(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
