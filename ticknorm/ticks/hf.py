"""A Hugging Face `Trainer` callback that records every norm's range while the model trains:

    trainer = Trainer(model, args, train_dataset=..., callbacks=[TicksCallback("ticks.jsonl", every=50)])

Needs transformers (`pip install 'ticknorm[hf]'`)."""

from ticknorm.base.optional import require
from ticknorm.ticks.trainers import TrainerTicks

require("transformers", "hf")  # a missing transformers names the extra to install
from transformers import TrainerCallback  # noqa: E402 - after the check above


class TicksCallback(TrainerCallback):
    def __init__(self, path, every: int = 50, modules=None):
        self.ticks = TrainerTicks(str(path), every, modules)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ticks.begin(model, state.global_step, state.is_world_process_zero)

    def on_step_end(self, args, state, control, **kwargs):
        self.ticks.advance(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.ticks.end()
