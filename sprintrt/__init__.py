"""sprintrt: a deployment compiler for SANA-Sprint (export → engines → runtime → benchmarks).

    from sprintrt import SprintPipeline
    pipe = SprintPipeline.from_engines("engines/")

The public names are loaded on first use, so `import sprintrt` imports neither torch, diffusers nor
an engine library.
"""

__version__ = "0.1.0"

# Public name → the module that defines it (loaded lazily by __getattr__).
_PUBLIC = {
    "SprintPipeline": "sprintrt.runtime.pipeline",
    "SprintPipelineOutput": "sprintrt.runtime.pipeline",
    "SprintImg2ImgPipeline": "sprintrt.runtime.img2img",
    "SprintControlNetPipeline": "sprintrt.runtime.controlnet",
    "PromptEmbeddingCache": "sprintrt.runtime.prompt_cache",
    "build_engines": "sprintrt.engines.build",
    "SprintError": "sprintrt.errors",
    "InvalidInputError": "sprintrt.errors",
    "EngineDirError": "sprintrt.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sprintrt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
