"""A transformers TrainerCallback that drives the PEGE curriculum and makes Trainer checkpoints resumable."""

from __future__ import annotations

import os

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..quant.modules import set_progress

logger = logging.get_logger(__name__)

# what QAT needs to continue, beside the packed model.safetensors Trainer writes through save_pretrained:
# the latent float weights and every quantizer parameter and buffer (the model's full state dict)
QAT_STATE_FILE = "pege_qat_state.safetensors"


def save_qat_state(model, checkpoint_dir: str) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(checkpoint_dir, QAT_STATE_FILE))


def load_qat_state(model, checkpoint_dir: str) -> None:
    """Restore the latent weights and quantizer state saved by ``save_qat_state`` (strictly: every key)."""
    path = os.path.join(checkpoint_dir, QAT_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint_dir} has no {QAT_STATE_FILE}: it was not saved with PEGECallback, so the "
                                "latent weights of PEGE quantization-aware training cannot be restored from it")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(path, device=str(device)), strict=True)


class PEGECallback(TrainerCallback):
    """Drives PEGE under transformers' Trainer.

    - Sets training progress global_step / max_steps on the model before every optimizer step (the
      curriculum r(t)).
    - Trainer checkpoints: beside the packed model Trainer saves, writes ``pege_qat_state.safetensors``
      (latent float weights + quantizer state); when training resumes from a checkpoint of the output
      dir, restores it, so a resumed run continues exactly where the interrupted one stopped. With
      ``load_best_model_at_end`` the best checkpoint's latent state is restored too.

    Usage: ``Trainer(model=pege_model, ..., callbacks=[pege_hf.PEGECallback()])``.
    """

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and state.max_steps:
            set_progress(model, min(1.0, state.global_step / state.max_steps))

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if model is not None and state.is_world_process_zero and os.path.isdir(checkpoint):
            save_qat_state(model, checkpoint)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step == 0:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(checkpoint):
            load_qat_state(model, checkpoint)
        else:
            logger.warning(f"PEGECallback: resuming at step {state.global_step} but {checkpoint} does not exist; the "
                           "latent weights stay as loaded from the packed checkpoint (the quantized values)")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and args.load_best_model_at_end and state.best_model_checkpoint:
            load_qat_state(model, state.best_model_checkpoint)
