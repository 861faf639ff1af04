"""The precision policy: which parts of a model stay in fp32 when a runtime computes in fp16.

Built once, from a measured fp32 run, and handed to every runtime alike (TensorRT keeps the ONNX
nodes in fp32, PyTorch the modules), so `compare` and `report` judge the same fp16 model."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Fp32Island:
    module: str  # the PyTorch module ('' for the root)
    node: str  # the ONNX node
    reason: str  # what the fp32 run measured, e.g. "variance reaches 7.2e+05 > fp16 max"


@dataclass(frozen=True)
class Precision:
    islands: tuple = ()  # Fp32Island

    @property
    def nodes(self) -> list[str]:
        return [island.node for island in self.islands]

    @property
    def modules(self) -> list[str]:
        return [island.module for island in self.islands]
