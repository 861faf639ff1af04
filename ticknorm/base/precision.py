"""The precision policy: what to compute in fp16 or bf16, and which parts stay in fp32.

One object from the command line down: the low type, the I/O types, the modules the user keeps in
fp32, the limits of the measured rules, the ticks file recorded while the model trained (whose
norm ranges are the real data's, not the export's example inputs'), and, once an fp32 reference
run measured the model, the fp32 islands with their reasons. The ONNX conversion writes it into the graph; the PyTorch
targets keep the islands' modules in fp32; TensorRT builds the converted graph; every command
judges a low-precision run at its type's tolerance, so one model gets one verdict everywhere."""

import json
from dataclasses import asdict, dataclass, replace

import onnx

from ticknorm.base.errors import InputSpecError

LOW_TYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
PRECISIONS = ("fp32", *LOW_TYPES)
TYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LARGEST = {"fp16": 65504.0, "bf16": 3.3895314e38}
SMALLEST_NORMAL = {"fp16": 6.103515625e-05, "bf16": 1.1754944e-38}
# From the finest to the coarsest by the tolerance each type is judged at (bf16 keeps 8 mantissa bits, fp16 11).
BY_COARSENESS = ("fp32", "fp16", "bf16")
PRECISION_KEY = "ticknorm.precision"  # model metadata: the policy a converted graph was written with


def coarser(*precisions: str) -> str:
    """The coarsest of some precisions: a run in one judged against a reference in another is
    judged at the bar of the coarser (an fp32 graph against a bf16 checkpoint's PyTorch: bf16's)."""
    return max(precisions, key=BY_COARSENESS.index)


@dataclass(frozen=True)
class Fp32Island:
    module: str  # the PyTorch module ('' for the root)
    node: str  # the ONNX node
    reason: str  # what the fp32 run measured, e.g. "variance reaches 7.2e+05 > fp16 max 65504"


@dataclass(frozen=True)
class Precision:
    dtype: str = "fp32"  # fp32, fp16 or bf16
    io_types: str = "fp32"  # fp32: graph inputs and outputs stay fp32; low: they take the low type
    keep_fp32: tuple[str, ...] = ()  # globs the user keeps in fp32: module scopes, node names, op:TYPE
    underflow_limit: float = 0.01  # share of a tensor's nonzero values the low type may flush to zero or subnormals
    islands: tuple[Fp32Island, ...] = ()  # measured
    # A ticks file (ticknorm.ticks.Recorder): norms whose training ranges overflow stay fp32.
    calibration: str | None = None

    def __post_init__(self):
        if self.dtype not in PRECISIONS:
            raise InputSpecError(f"unknown precision '{self.dtype}'; choose one of: {', '.join(PRECISIONS)}")
        if self.io_types not in ("fp32", "low"):
            raise InputSpecError(f"--io-types takes fp32 or low, not '{self.io_types}'")
        if self.calibration is not None:
            if not self.low:
                raise InputSpecError("--calibration chooses fp32 islands of a low-precision graph: give --precision "
                                     "fp16 or bf16 with it")
            object.__setattr__(self, "calibration", str(self.calibration))  # a Path too; the graph's metadata is JSON

    @property
    def low(self) -> bool:
        return self.dtype != "fp32"

    @property
    def elem_type(self) -> int:
        return LOW_TYPES.get(self.dtype, onnx.TensorProto.FLOAT)

    @property
    def nodes(self) -> list[str]:
        return [island.node for island in self.islands]

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(island.module for island in self.islands))

    def with_dtype(self, dtype: str) -> "Precision":
        """The same requests for another low type (its islands are measured anew)."""
        return replace(self, dtype=dtype, islands=())

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def of_graph(cls, model: onnx.ModelProto) -> "Precision":
        """The policy a converted graph carries; fp32 for any other graph."""
        for prop in model.metadata_props:
            if prop.key == PRECISION_KEY:
                data = json.loads(prop.value)
                islands = tuple(Fp32Island(**island) for island in data.pop("islands", ()))
                return cls(**{**data, "keep_fp32": tuple(data.get("keep_fp32", ()))}, islands=islands)
        return cls()

    def island_lines(self) -> list[str]:
        return [f"{island.module or '(root)'} [{island.node}]: {island.reason}" for island in self.islands]
