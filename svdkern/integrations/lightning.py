"""SVD training in Lightning: `lightning.Trainer(callbacks=[SVDTrainingCallback(...)])` on a
LightningModule whose layers are already in SVD form (`svdkern.decompose` first).

The regularizer's gradient is added once per optimizer step at `on_before_optimizer_step`,
after every accumulated micro-batch, where Lightning has unscaled fp16 gradients and before
it clips them. The prune slices the optimizer's state in place. The callback's state (pruned
or not) is saved in Lightning's checkpoints, so `Trainer.fit(..., ckpt_path=...)` into a
freshly decomposed module (loading adopts the saved ranks) goes on fine-tuning and never
prunes again.
"""
from __future__ import annotations

from lightning.pytorch import Callback

from .common import SettingsCallback, torch_optimizer


class SVDTrainingCallback(SettingsCallback, Callback):
    """`lightning.Trainer` callback for SVD training; arguments as
    `svdkern.integrations.common.CallbackSettings` (checked here, before any training)."""

    _restored_finetuning = False  # set by load_state_dict from a checkpoint
    _seen_step = 0  # the trainer's global step when this callback last acted

    def on_fit_start(self, trainer, pl_module):
        self.training = self.settings.schedule(pl_module)
        if self._restored_finetuning:
            self.training.start_finetuning()

    def on_train_start(self, trainer, pl_module):
        self._seen_step = trainer.global_step
        if self.settings.prune_step == 0:
            self.training.on_step_end(trainer.global_step, self._optimizer(trainer))

    def on_train_epoch_start(self, trainer, pl_module):
        if self.settings.prune_epoch is not None:
            self.training.on_epoch_start(trainer.current_epoch, self._optimizer(trainer))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.training.backward_penalty()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # every micro-batch ends here: act once an optimizer step has completed
        if self.settings.prune_step is not None and trainer.global_step != self._seen_step:
            self._seen_step = trainer.global_step
            self.training.on_step_end(trainer.global_step, self._optimizer(trainer))

    def state_dict(self) -> dict:
        return {"finetuning": bool(self.training is not None and self.training.finetuning)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_finetuning = bool(state_dict.get("finetuning", False))

    @staticmethod
    def _optimizer(trainer):
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SVDTrainingCallback: pruning slices one optimizer's state, the "
                             f"trainer has {len(trainer.optimizers)}")
        return torch_optimizer(trainer.optimizers[0])
