"""What every trainer callback does with a recorder, whatever the framework: start it when
training starts (on the main process only: one writer per file, as in a distributed run every
process trains the same weights), follow the trainer's global step (right when a run resumes
from a checkpoint, and a step is an optimizer step under gradient accumulation), stop at the end."""

from dataclasses import dataclass

from ticknorm.ticks.recorder import Recorder, checked_every


@dataclass
class TrainerTicks:
    path: str
    every: int = 50
    modules: object = None  # as Recorder's: None for the norms, a glob, or module classes
    recorder: Recorder | None = None

    def __post_init__(self):
        checked_every(self.every)  # refused when the callback is made, not when training starts

    def begin(self, model, global_step: int, main_process: bool) -> None:
        if main_process:
            self.recorder = Recorder(model, self.path, every=self.every, modules=self.modules,
                                     first_step=global_step).start()

    def advance(self, global_step: int) -> None:
        if self.recorder is not None:
            self.recorder.step(to=global_step)

    def end(self) -> None:
        if self.recorder is not None:
            self.recorder.stop()
            self.recorder = None
