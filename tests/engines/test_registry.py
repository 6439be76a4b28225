"""The build and run registries: every backend module satisfies its side's contract with the declared names and
signatures, and is called here with exactly those keywords."""

from __future__ import annotations

import inspect

import pytest

from sprintrt import machine
from sprintrt import specs as S
from sprintrt.engines.precision import Precision
from sprintrt.engines.profiles import ProfileOptions, input_shapes
from sprintrt.engines.registry import BUILD_BACKENDS, BuildBackend, BuildResult, backend_module
from sprintrt.runtime.engine import Engine
from sprintrt.runtime.registry import RUN_BACKENDS, engine_class

EPYC = {"kind": "cpu", "arch": "x86_64", "name": "EPYC", "isa": ["avx2", "fma"]}
H100 = {"kind": "gpu", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
MODEL = S.ModelDims(vocab_size=1024, text_hidden=32, latent_channels=32, vae_scale_factor=32, text_len_max=624,
                    text_layers=2, text_kv_heads=1, text_head_dim=16, chi_tokens=114)


def _declared_methods() -> dict[str, list[str]]:
    """The contract's functions and their parameter names, as BuildBackend declares them."""
    return {name: [p for p in inspect.signature(fn).parameters if p != "self"]
            for name, fn in vars(BuildBackend).items() if inspect.isfunction(fn) and not name.startswith("_")}


def test_every_backend_is_registered_on_both_sides():
    assert set(BUILD_BACKENDS) == set(RUN_BACKENDS)
    assert _declared_methods()  # the Protocol declares functions (a renamed Protocol would make this vacuous)


@pytest.mark.parametrize("name", list(BUILD_BACKENDS))
def test_build_module_has_the_declared_names_and_signatures(name):
    mod = backend_module(name)
    assert mod.NAME == name and mod.DEVICE in ("cpu", "gpu")
    for attr in BuildBackend.__annotations__:
        assert hasattr(mod, attr), f"{mod.__name__} lacks {attr}"
    assert set(mod.ALLOWED) == set(S.COMPONENTS)
    assert all(isinstance(p, Precision) for ps in mod.ALLOWED.values() for p in ps)
    for method, params in _declared_methods().items():
        got = list(inspect.signature(getattr(mod, method)).parameters)
        assert got == params, f"{mod.__name__}.{method}{tuple(got)} does not match the contract's {tuple(params)}"


@pytest.mark.parametrize("name", list(BUILD_BACKENDS))
def test_build_module_answers_the_declared_keywords(name):
    mod = backend_module(name)
    target = EPYC if mod.DEVICE == "cpu" else H100
    versions = {mod.LIBRARY: "1.0"}
    assert isinstance(mod.auto_preference(), int)
    assert isinstance(mod.capabilities(target=target), str)
    defaults = mod.default_precisions(versions=versions, target=target)
    assert set(defaults) == set(S.COMPONENTS) and all(defaults[c] in mod.ALLOWED[c] for c in S.COMPONENTS)
    for component in S.COMPONENTS:
        base = mod.quantized_base(component=component, target=target, precision=Precision.INT8)
        assert base is None or base in mod.TYPED_PRECISIONS
        mod.check_buildable(component=component, precision=defaults[component],
                            export_record={"file": f"{component}.onnx", "trt_lint": []}, versions=versions,
                            target=target)
        spec = S.SPEC_BUILDERS[component](MODEL)
        profile = mod.profile(spec=spec, model=MODEL, options=ProfileOptions())
        assert set(profile) == set(spec.dims())


@pytest.mark.parametrize("name", [n for n in BUILD_BACKENDS if backend_module(n).DEVICE == "cpu"])
def test_cpu_build_component_with_the_declared_keywords(name, onnx_dir, tmp_path):
    """A real build through the contract's keywords, for the backends this CPU builds."""
    mod = backend_module(name)
    if machine.library_version(mod.LIBRARY) is None:
        pytest.skip(f"{mod.LIBRARY} is not installed")
    spec = S.SPEC_BUILDERS[S.VAE_DECODER](MODEL)
    profile = mod.profile(spec=spec, model=MODEL, options=ProfileOptions())
    out = tmp_path / f"vae_decoder{mod.SUFFIX}"
    result = mod.build_component(source=onnx_dir / "vae_decoder.onnx", out=out, component=S.VAE_DECODER,
                                 precision=Precision.FP32, shapes=input_shapes(spec, profile),
                                 target=mod.build_target(), versions=mod.library_versions(), compiled_cache=False)
    assert isinstance(result, BuildResult) and out.is_file() and all(f.is_file() for f in result.extra_files)


@pytest.mark.parametrize("name", list(RUN_BACKENDS))
def test_run_side_engine_classes(name):
    cls = engine_class(name)
    assert issubclass(cls, Engine) and cls is not Engine
    assert cls._open is not Engine._open and cls._infer is not Engine._infer  # a backend supplies both
    assert list(inspect.signature(cls._open).parameters) == ["self", "entry", "options", "context"]
