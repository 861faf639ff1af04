"""A Lightning callback that records every norm's range while the model trains:

    trainer = lightning.pytorch.Trainer(callbacks=[TicksCallback("ticks.jsonl", every=50)])

Needs lightning (`pip install 'ticknorm[lightning]'`). A `training_step` that calls submodules
rather than the LightningModule itself ends each tick at the batch's end."""

from ticknorm.base.optional import require
from ticknorm.ticks.trainers import TrainerTicks

require("lightning.pytorch", "lightning")  # a missing lightning names the extra to install
from lightning.pytorch import Callback  # noqa: E402 - after the check above


class TicksCallback(Callback):
    def __init__(self, path, every: int = 50, modules=None):
        self.ticks = TrainerTicks(str(path), every, modules)

    def on_fit_start(self, trainer, pl_module):
        self.ticks.begin(pl_module, trainer.global_step, trainer.is_global_zero)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ticks.advance(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        self.ticks.end()
