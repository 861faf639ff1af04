"""Record every norm's range while a model trains, at a tick every `every` optimizer steps.

Between ticks the model carries no hook at all. A tick attaches forward hooks to the chosen
modules and to the model itself; they record the next forward (training or validation batch,
whichever runs first) and are removed when the model's forward returns. The record is labelled
with the step count at which the tick was armed:

    with Recorder(model, "ticks.jsonl", every=50) as recorder:   # armed: the first forward is step 0
        for batch in loader:
            loss = model(batch).loss
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            recorder.step()           # step 50, 100, ...: arms a tick for the next forward

so step N's record is what the weights after N optimizer steps compute. `tick()` arms one now. A
loop that never calls the model itself (a Lightning `training_step` calling submodules) ends the
tick at its next `step()` instead. Hooks compute on the module's device in float32 with float64
sums under `torch.no_grad`, on detached tensors, and the tick syncs with the host once, when it
is written."""

from pathlib import Path
from typing import TYPE_CHECKING

from ticknorm.base.errors import TicksError
from ticknorm.ticks.log import append_ticks
from ticknorm.ticks.modules import chosen_modules
from ticknorm.ticks.stats import merge, reduce_tensor, statistics

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle


class Recorder:
    def __init__(self, model, path, every: int = 50, modules=None, first_step: int = 0):
        """`modules`: None for every LayerNorm- and RMSNorm-like module, a glob on module paths,
        or module classes. `first_step`: the step count the run resumes from."""
        self.model, self.path, self.every = model, Path(path), checked_every(every)
        self.modules = chosen_modules(model, modules)
        self.steps = first_step
        self._tick_step: int | None = None  # the step an armed tick records as
        self._handles: list[RemovableHandle] = []
        # (module path, side) -> reduced vector, in the order the hooks fired
        self._pending: dict[tuple[str, str], torch.Tensor] = {}

    def __enter__(self) -> "Recorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Recorder":
        """Arm the first tick: the model's ranges before any step of this run."""
        self.tick()
        return self

    def stop(self) -> None:
        """Write what an unfinished tick recorded, and remove its hooks."""
        self._finish()

    def step(self, to: int | None = None) -> None:
        """One optimizer step done (or the step count is now `to`, a trainer's global step): a
        tick is armed when the count reaches a multiple of `every`. An open tick ends here."""
        self._finish()
        before = self.steps
        self.steps = before + 1 if to is None else to
        if self.steps // self.every > before // self.every:
            self.tick()

    def tick(self) -> None:
        """Record the next forward, labelled with the current step count."""
        self._tick_step = self.steps
        if self._handles:
            return
        for path, module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook(path), with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(lambda *_: self._finish()))

    def _hook(self, path: str):
        def record(module, args, kwargs, output):
            import torch

            with torch.no_grad():
                for side, value in (("input", _first_float((args, kwargs))), ("output", _first_float(output))):
                    reduced = reduce_tensor(value) if value is not None else None
                    if reduced is not None:
                        earlier = self._pending.get((path, side))
                        self._pending[(path, side)] = reduced if earlier is None else merge(earlier, reduced)
        return record

    def _finish(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if not self._pending:
            return
        import torch

        keys, vectors = list(self._pending), list(self._pending.values())
        self._pending = {}
        rows = torch.stack([v.to(vectors[0].device) for v in vectors]).tolist()  # the tick's one sync
        records: dict[str, dict] = {}
        for (path, side), values in zip(keys, rows):
            records.setdefault(path, {"step": self._tick_step, "module": path}).update(statistics(values, side))
        append_ticks(self.path, list(records.values()))


def checked_every(every) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise TicksError(f"every={every!r}: ticks come every N optimizer steps, N a whole number >= 1")
    return every


def _first_float(value):
    """The first floating-point tensor in a module's arguments or output (tensors, tuples, lists
    and dicts of them, such as a ModelOutput)."""
    if hasattr(value, "is_floating_point"):
        return value if value.is_floating_point() else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_float(item)
        if found is not None:
            return found
    return None
