"""What fusion found, fused, left and refused, per normalization, for people and for JSON."""

import json
from dataclasses import asdict, dataclass, field

from ticknorm.plugins import PLUGIN_NAME, PLUGIN_NAMESPACE


# Which runtimes take each fused norm op: the reason a user picks --opset / --rms-target / --ln-target.
NORM_OP_RUNTIMES = {
    "LayerNormalization": "ONNX Runtime; TensorRT (its own normalization layer)",
    "RMSNormalization": "ONNX Runtime (opset 23); TensorRT only where its ONNX parser lists the op",
    "SimplifiedLayerNormalization": "ONNX Runtime only (its own op; --opset 23 gives the standard RMSNormalization)",
    "com.microsoft::SkipLayerNormalization": "ONNX Runtime only",
    "com.microsoft::SkipSimplifiedLayerNormalization": "ONNX Runtime only",
    f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}": "TensorRT with ticknorm's plugin only",
}


# A fused record's note when ONNX Runtime could not run the original (`verify._original_runs`).
ORIGINAL_RUN_IN = "the original was run in "


@dataclass
class NormRecord:
    kind: str  # LayerNorm | RMSNorm
    scope: str  # the PyTorch module it came from
    status: str  # fused | refused | left
    reason: str = ""  # why refused or left
    node: str = ""  # the first original ONNX node of the match (where to look in the input graph)
    output: str = ""
    epsilon: float | None = None
    notes: list[str] = field(default_factory=list)
    max_abs_error: float | None = None  # fused vs original, from verification
    op: str = ""  # the op it became (or would become at a higher opset)
    input: str = ""  # the tensor the fused op normalizes


@dataclass
class FusionReport:
    opset_before: int
    opset_after: int
    records: list[NormRecord] = field(default_factory=list)
    verified: bool = False
    inlined: dict[str, int] = field(default_factory=dict)  # calls inlined, by local function, to reach its norms
    dead_removed: int = 0  # nodes nothing read any more once the norms were fused, removed
    skips: int = 0  # residual Adds fused into the norm they feed (ONNX Runtime's Skip norms)
    token_rows: int = 0  # post-LN residuals written over token rows, which ONNX Runtime keeps unfused

    def not_fused(self) -> list[NormRecord]:
        """The decomposed norms still in the graph (refused, or left at this opset)."""
        return [r for r in self.records if r.status != "fused"]

    def count(self, status: str, kind: str | None = None) -> int:
        return sum(r.status == status and (kind is None or r.kind == kind) for r in self.records)

    def summary(self) -> str:
        """What is still decomposed comes first: a user reading "wrote" must not take the file for
        fully fused while norms were refused or left."""
        lines = self._not_fused_lines()
        for kind in ("LayerNorm", "RMSNorm"):
            found = sum(r.kind == kind for r in self.records)
            if found:
                lines.append(f"{kind}: found {found}, fused {self.count('fused', kind)}, "
                             f"refused {self.count('refused', kind)}, left {self.count('left', kind)}")
        if not self.records:
            lines.append("no decomposed LayerNorm or RMSNorm found")
        if self.opset_after != self.opset_before:
            lines.append(f"opset raised {self.opset_before} -> {self.opset_after}")
        if self.inlined:
            lines.append("norms inside local functions: inlined " + ", ".join(
                f"{name} ({calls} call{'s' * (calls > 1)})" for name, calls in self.inlined.items())
                         + ", as ONNX Runtime does when it loads the model")
        if self.dead_removed:
            lines.append(f"removed {self.dead_removed} node{'s' * (self.dead_removed > 1)} nothing read any more "
                         "(Casts and Identities the fused norms bypass, and any other dead node)")
        if self.skips:
            lines.append(f"residual Add + norm: {self.skips} fused into ONNX Runtime's Skip norms (--skip-norms; "
                         "checked with the whole graph against PyTorch)")
        if self.token_rows:
            lines.append(f"residual Add + LayerNorm: {self.token_rows} written over token rows, which ONNX Runtime "
                         "runs as Add + LayerNormalization, not as its SkipLayerNormalization (a scalar CPU kernel, "
                         "4.5x slower); checked with the whole graph against PyTorch")
        for op in sorted({r.op for r in self.records if r.status == "fused"}):
            lines.append(f"{op}: {NORM_OP_RUNTIMES.get(op, 'ONNX Runtime')}")
        if self.verified and self.count("fused"):
            worst = max(r.max_abs_error or 0.0 for r in self.records if r.status == "fused")
            elsewhere = any(note.startswith(ORIGINAL_RUN_IN) for r in self.records for note in r.notes)
            where = " (the original in onnx's reference evaluator)" if elsewhere else ""
            lines.append(f"verified in ONNX Runtime{where}: max |fused - original| = {worst:.3g}")
        return "\n".join(lines)

    def strict_failure(self, output) -> str | None:
        """`fuse --strict`'s one line when a norm is still decomposed (None when every one was
        fused): the file is written all the same, since the fused ones are verified, but the job
        asked for is not done."""
        left = self.not_fused()
        if not left:
            return None
        return (f"--strict: {len(left)} decomposed norm{'s' * (len(left) > 1)} not fused, the first "
                f"{_described(left[0])}; {output} was written with the others fused")

    def _not_fused_lines(self) -> list[str]:
        left = self.not_fused()
        if not left:
            return []
        many = f"{len(left)} decomposed norms remain, the first" if len(left) > 1 else "1 decomposed norm remains"
        return [f"not fused: {many}: {_described(left[0])}: {left[0].reason}"] + [
            f"  {_described(record)}: {record.reason}" for record in left[1:]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _described(record: NormRecord) -> str:
    """Where to look for a norm in the input graph: its module scope and first ONNX node."""
    return f"{record.status} {record.kind} at {record.scope or '(root)'} ({record.node})"
