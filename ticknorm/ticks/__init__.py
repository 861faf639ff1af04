"""Ticks during fine-tuning: every norm's range recorded while the model trains (`Recorder`, with
adapters for a Hugging Face Trainer in `ticknorm.ticks.hf` and Lightning in
`ticknorm.ticks.lightning`), read back (`read_ticks`) and summed up per module (`summarize_ticks`).
torch is imported when a recorder is built, not here."""

from ticknorm.ticks.log import read_ticks
from ticknorm.ticks.ranges import TickSummary, summarize_ticks
from ticknorm.ticks.recorder import Recorder

__all__ = ["Recorder", "TickSummary", "read_ticks", "summarize_ticks"]
