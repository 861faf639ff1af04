"""One exception family, so the CLI can turn any of them into one line and an exit code.

Exit codes are part of the contract with CI scripts: 0 pass, 1 an accuracy or drift failure
(the numbers are wrong), 2 a usage or environment error (the request could not be carried out).
"""


class TicknormError(Exception):
    """Base class: the message is a complete sentence a user can act on."""

    exit_code = 2


class InputSpecError(TicknormError):
    """An `--input` spec, an `.npz` file or a feed does not fit the model."""


class CheckpointError(TicknormError):
    """A checkpoint, factory or model directory cannot be loaded into the model."""


class ExportError(TicknormError):
    """torch.onnx could not export the model."""


class OnnxFileError(TicknormError):
    """An ONNX file is missing, corrupt or cannot be written."""


class WeightsOutsideError(OnnxFileError):
    """An ONNX file whose external weights point outside its folder (`../x.bin`, an absolute path,
    a link that leaves it): refused before any byte of that file is read."""


class FusionError(TicknormError):
    """A fusion request cannot be carried out (for example the opset cannot hold the op)."""


class MissingDependencyError(TicknormError):
    """An optional dependency is not installed; the message names the pip extra."""


class AccuracyError(TicknormError):
    """Numbers differ beyond tolerance: a fused graph, a runtime or a drift check."""

    exit_code = 1


class RuntimeUnavailable(TicknormError):
    """A runtime was asked for that this machine cannot provide; the message says why."""


class RuntimeFailure(TicknormError):
    """A runtime could not build or run the model (its own error, in one line): ONNX Runtime
    refusing a graph or a feed, TensorRT's parser, builder or execution failing."""


class BundleError(TicknormError):
    """A golden bundle that cannot be used: missing, corrupt, or made for another model."""


class OutputPathError(TicknormError):
    """An output cannot be written where it was asked for (a read-only folder, a parent that is a
    file): found before any work is done."""


class KernelAbiError(TicknormError):
    """The compiled LayerNorm kernel does not have the argument list TensorRT will call it with."""


class TicksError(TicknormError):
    """A training-ticks request that cannot be carried out: a recorder asked for no module or a
    step interval below one, a ticks file that is missing or holds no ticks, a calibration made
    on another model."""


class TicknormWarning(UserWarning):
    """Something was skipped and the work went on (a cut-short line of a ticks file, recorded
    modules a graph lacks): the CLI prints it as one line, like its errors."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: what fits in a one-line CLI error."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
