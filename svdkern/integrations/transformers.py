"""SVD training in Hugging Face `transformers.Trainer`: `Trainer(..., callbacks=[
SVDTrainingCallback(...)])` on a model already in SVD form (`svdkern.decompose` first).

The regularizer's gradient is added once per optimizer step, after every accumulated
micro-batch, on unscaled gradients: under fp16 the callback unscales them first through the
trainer's `GradScaler` (public `unscale_`, which the scaler's step then skips). The
callback runs at `on_pre_optimizer_step`, which the Trainer calls after clipping: its
`max_grad_norm` (and the logged `grad_norm`) covers the task gradient, not the penalty's
(Lightning clips the sum). No callback event of the Trainer lies between the last
backward and the clipping. The prune slices the
optimizer's state in place (accelerate wraps the optimizer; the torch optimizer inside holds
the state). A run resumed from a checkpoint written after the prune, into a freshly
decomposed model (`trainer.train(resume_from_checkpoint=...)`: loading adopts the saved
ranks), goes on fine-tuning and never prunes again.
"""
from __future__ import annotations

import math

from transformers import TrainerCallback

from .common import SettingsCallback, torch_optimizer


class SVDTrainingCallback(SettingsCallback, TrainerCallback):
    """`transformers.Trainer` callback for SVD training; arguments as
    `svdkern.integrations.common.CallbackSettings` (checked here, before any training)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.training = self.settings.schedule(model)
        self.training.resumed_at(state.global_step, state.epoch or 0.0)
        # the loop's epochs, counted here: state.epoch stays fractional for data of no length
        self._epoch = math.floor(state.epoch or 0.0)
        if self.settings.prune_step == 0:
            self.training.on_step_end(state.global_step, torch_optimizer(optimizer))

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.settings.prune_epoch is not None:
            self.training.on_epoch_start(self._epoch, torch_optimizer(optimizer))
        self._epoch += 1

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            try:
                scaler.unscale_(torch_optimizer(optimizer))
            except RuntimeError:
                pass  # gradient clipping already unscaled them this step
        self.training.backward_penalty()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.settings.prune_step is not None:
            self.training.on_step_end(state.global_step, torch_optimizer(optimizer))
