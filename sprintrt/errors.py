"""Typed errors. Each message says what failed, what was expected, what was given, and the fix."""


class SprintError(Exception):
    """Base class of every error sprintrt raises on purpose."""


class InvalidInputError(SprintError, ValueError):
    """A call argument is out of its allowed range."""


class EngineDirError(SprintError):
    """An engine directory or its manifest is missing, corrupt, stale or from another model."""


class ModelLoadError(SprintError):
    """A checkpoint or ONNX file cannot be read."""


class ExportValidationError(SprintError):
    """An exported ONNX graph disagrees with PyTorch beyond tolerance."""


class EngineBuildError(SprintError):
    """An engine library refused to build an engine from a graph that passed every check before it."""


class OutOfSpaceError(EngineBuildError, OSError):
    """A build ran out of disk space (or would: a pre-flight estimate says it cannot fit)."""


class DeadlineExceeded(SprintError, TimeoutError):
    """A call passed the deadline its caller set (SprintPipeline.deadline) and stopped at a stage boundary."""


class CallCancelled(SprintError):
    """A call was cancelled by its caller (SprintPipeline.cancel_when) and stopped at a stage boundary."""


class MissingDependencyError(SprintError, ImportError):
    """An optional package (torch, TensorRT, ...) is needed for this call but is not installed."""


def invalid(name: str, value, allowed: str, fix: str) -> InvalidInputError:
    """Build an InvalidInputError with the house message format."""
    return InvalidInputError(f"{name}={value!r} is not allowed: expected {allowed}. Fix: {fix}")


class Notice(UserWarning):
    """Not an error: something a caller should know about a call that still runs (a prompt cut to
    max_sequence_length, an argument the engines ignore). The CLI prints it as one `note:` line on stderr;
    quiet_libraries() never hides it."""


_NOTICED: set[str] = set()


def notice(message: str, once: str | None = None) -> None:
    """Emit `message` as a Notice; with `once`, only the first time this process emits that key (advice that
    does not change from call to call is said once, not per image)."""
    import warnings

    if once is not None:
        if once in _NOTICED:
            return
        _NOTICED.add(once)
    warnings.warn(message, Notice, stacklevel=3)
