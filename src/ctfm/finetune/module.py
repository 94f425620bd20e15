"""What every fine-tuning LightningModule shares: freezing by parameter-name prefix, the
non-finite-loss guard, and CT-FM's optimiser (AdamW with a warm-up cosine stepped per epoch).

A task's module subclasses :class:`FinetuneModule`, sets ``self.model`` in ``__init__`` and calls
``self.apply_freeze(0)`` once the model exists. The hyperparameters read here (saved with
``save_hyperparameters``) are ``freeze``, ``freeze_until_epoch``, ``lr``, ``weight_decay``,
``warmup_epochs``, ``max_epochs``, ``end_lr`` and ``warmup_multiplier``.
"""

from __future__ import annotations

import lightning as L
import torch

from ctfm.errors import CTInputError


class FinetuneModule(L.LightningModule):
    model: torch.nn.Module

    # ---- freezing ------------------------------------------------------------------------
    def frozen(self, epoch: int) -> bool:
        """Whether the ``freeze`` prefixes are held fixed in ``epoch`` (until ``freeze_until_epoch``; -1: always)."""
        until = self.hparams.freeze_until_epoch
        return bool(self.hparams.freeze) and (until < 0 or epoch < until)

    def apply_freeze(self, epoch: int) -> None:
        """Parameters under the ``freeze`` prefixes get no gradient while :meth:`frozen`."""
        prefixes = tuple(self.hparams.freeze or ())
        freeze = self.frozen(epoch)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(not (freeze and name.startswith(prefixes)))

    def on_train_epoch_start(self) -> None:
        self.apply_freeze(self.current_epoch)
        if self.frozen(self.current_epoch):
            # Lightning puts the whole model in train mode each epoch: BatchNorm layers inside
            # frozen prefixes go back to eval so that their running statistics stay fixed too.
            prefixes = tuple(self.hparams.freeze)
            for name, module in self.model.named_modules():
                if name.startswith(prefixes) and isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    # ---- training ------------------------------------------------------------------------
    def checked_loss(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Log ``train/loss`` and return it; a non-finite loss stops the run with a one-line error."""
        if not torch.isfinite(loss):

            raise CTInputError(None, f"training diverged: non-finite loss at step {self.global_step}", "use precision 32-true or a lower lr; resume from checkpoints/last.ckpt")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self):
        from monai.optimizers import WarmupCosineSchedule

        hp = self.hparams
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        # Stepped per epoch, as CT-FM's recipe configures it (warm-up and t_total in epochs).
        schedule = WarmupCosineSchedule(optimizer, warmup_steps=hp.warmup_epochs, t_total=hp.max_epochs, end_lr=hp.end_lr, warmup_multiplier=hp.warmup_multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
