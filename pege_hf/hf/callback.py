"""A transformers TrainerCallback that drives the PEGE curriculum from the Trainer's step count."""

from __future__ import annotations

from transformers import TrainerCallback

from ..quant.modules import set_progress


class PEGECallback(TrainerCallback):
    """Sets training progress global_step / max_steps on the model before every optimizer step.

    Usage: ``Trainer(model=pege_model, ..., callbacks=[pege_hf.PEGECallback()])``.
    """

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and state.max_steps:
            set_progress(model, min(1.0, state.global_step / state.max_steps))
