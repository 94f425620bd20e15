"""What every fine-tuning LightningModule shares: freezing by parameter-name prefix, the
non-finite-loss guard, and the run's optimiser (:class:`ctfm.runs.OptimizerConfig`: AdamW with a
warm-up cosine stepped per epoch).

A task's module subclasses :class:`FinetuneModule`, takes an ``optimizer`` argument, calls
:meth:`FinetuneModule.save_run_hyperparameters` first, sets ``self.model`` and calls
``self.apply_freeze(0)`` once the model exists. The hyperparameters read here are ``freeze``,
``freeze_until_epoch`` and ``optimizer`` (the OptimizerConfig's mapping).
"""

from __future__ import annotations

import inspect

import torch

from ctfm.errors import CTInputError, OptionError, optional_import
from ctfm.runs import OptimizerConfig, RunFolder, warmup_cosine_optimizer

L = optional_import("lightning", "train")


class FinetuneModule(L.LightningModule):
    model: torch.nn.Module

    def save_run_hyperparameters(self, optimizer: OptimizerConfig | dict | None) -> None:
        """Save the caller's ``__init__`` arguments as hyperparameters, ``optimizer`` as a plain mapping
        (so that checkpoints load with ``weights_only=True``)."""
        self.save_hyperparameters(ignore=["optimizer"], frame=inspect.currentframe().f_back)
        self.save_hyperparameters({"optimizer": OptimizerConfig.of(optimizer).to_dict()})

    # ---- freezing ------------------------------------------------------------------------
    def frozen(self, epoch: int) -> bool:
        """Whether the ``freeze`` prefixes are held fixed in ``epoch`` (until ``freeze_until_epoch``; -1: always)."""
        until = self.hparams.freeze_until_epoch
        return bool(self.hparams.freeze) and (until < 0 or epoch < until)

    def apply_freeze(self, epoch: int) -> None:
        """Parameters under the ``freeze`` prefixes get no gradient while :meth:`frozen`."""
        prefixes = tuple(self.hparams.freeze or ())
        names = [name for name, _ in self.model.named_parameters()]
        unmatched = [p for p in prefixes if not any(name.startswith(p) for name in names)]
        if unmatched:
            tops = sorted({name.split(".")[0] for name in names})
            raise OptionError(
                f"freeze {unmatched}: no parameter name starts with it (names start with: {', '.join(tops)})"
            )
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
            fix = f"use precision 32-true or a lower lr; resume from {RunFolder.CHECKPOINTS}/{RunFolder.LAST}"
            raise CTInputError(None, f"training diverged: non-finite loss at step {self.global_step}", fix)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self):
        # Stepped per epoch, as CT-FM's recipe configures it (warm-up and the cosine in epochs).
        return warmup_cosine_optimizer(self.model.parameters(), self.hparams.optimizer)
