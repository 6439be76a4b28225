"""The thin runtime: engine backends, the NumPy TrigFlow scheduler, SprintPipeline. Imports no torch.

`from sprintrt.runtime import SprintPipeline` works; the pipeline module (and with it an engine
library) is imported on first use of the name.
"""

_PUBLIC = {"SprintPipeline": "sprintrt.runtime.pipeline", "SprintPipelineOutput": "sprintrt.runtime.pipeline",
           "SprintImg2ImgPipeline": "sprintrt.runtime.img2img",
           "SprintControlNetPipeline": "sprintrt.runtime.controlnet",
           "PromptEmbeddingCache": "sprintrt.runtime.prompt_cache"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sprintrt.runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
