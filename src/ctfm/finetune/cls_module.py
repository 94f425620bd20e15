"""The classification fine-tuning LightningModule: CTClassifier, BCE (binary, multi-label) or
cross-entropy (multi-class), validation AUROC (macro over outputs / one-vs-rest) gathered over ranks.

Training: image [B, C, D, H, W] -> logits [B, n_outputs] -> ``BCEWithLogitsLoss`` against
targets [B, n_outputs] in {0, 1}, or ``CrossEntropyLoss`` against class indices [B].
Validation logs ``val/loss`` and ``val/auroc`` (0 when undefined: one class only in validation).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ctfm.evaluate.metrics.classification import binary_metrics, multiclass_metrics
from ctfm.finetune.module import FinetuneModule
from ctfm.models.classifier import CTClassifier, load_trunk_weights
from ctfm.runs import OptimizerConfig


class ClassificationFinetuner(FinetuneModule):
    def __init__(
        self,
        task: str,
        label_names: list[str],
        in_channels: int = 1,
        model_kwargs: dict | None = None,
        head_hidden: int = 256,
        encoder_weights: str | None = None,
        seed: int = 0,
        freeze: list[str] | None = None,
        freeze_until_epoch: int = -1,
        optimizer: OptimizerConfig | dict | None = None,
    ):
        super().__init__()
        self.save_run_hyperparameters(optimizer)

        kwargs = dict(model_kwargs or {})
        n_outputs = len(label_names) if task in ("multilabel", "multiclass") else 1
        torch.manual_seed(seed)
        self.model = CTClassifier(
            n_outputs=n_outputs,
            head_hidden=head_hidden,
            in_channels=in_channels,
            init_filters=int(kwargs.get("init_filters", 32)),
            blocks_down=tuple(kwargs.get("blocks_down", (1, 2, 2, 4, 4))),
        )
        if encoder_weights:
            load_trunk_weights(self.model, encoder_weights)
        self.criterion = torch.nn.CrossEntropyLoss() if task == "multiclass" else torch.nn.BCEWithLogitsLoss()
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.apply_freeze(0)

    # ---- steps ---------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[B, C, D, H, W] -> logits [B, n_outputs]."""
        return self.model(image)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid per output (binary, multi-label) or softmax over classes (multi-class)."""
        return torch.softmax(logits, dim=1) if self.hparams.task == "multiclass" else torch.sigmoid(logits)

    def _loss(self, logits, target):
        return self.criterion(logits, target.long() if self.hparams.task == "multiclass" else target.float())

    def training_step(self, batch, batch_idx):
        loss = self._loss(self.model(batch["image"]), batch["target"])
        return self.checked_loss(loss, batch["image"].shape[0])

    def validation_step(self, batch, batch_idx):
        logits = self.model(batch["image"])
        self.log(
            "val/loss",
            self._loss(logits, batch["target"]),
            on_epoch=True,
            sync_dist=True,
            batch_size=batch["image"].shape[0],
        )
        self._val.append((self.probabilities(logits).detach().float(), batch["target"].detach()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        probs = torch.cat([p for p, _ in self._val])
        targets = torch.cat([t for _, t in self._val])
        self._val.clear()
        if self.trainer.world_size > 1:
            probs = self.all_gather(probs).flatten(0, 1)
            targets = self.all_gather(targets).flatten(0, 1)
        self.log(
            "val/auroc",
            validation_auroc(self.hparams.task, targets.cpu().numpy(), probs.cpu().numpy()),
            prog_bar=True,
            sync_dist=False,
        )


def validation_auroc(task: str, targets: np.ndarray, probabilities: np.ndarray) -> float:
    """AUROC of the validation cases: binary; macro over multi-label outputs; one-vs-rest macro for
    multi-class. 0.0 where undefined (a single class present), with a warning."""

    if task == "multiclass":
        present = np.unique(targets.astype(int))
        value = (
            multiclass_metrics(targets.astype(int), probabilities)["auroc_ovr"] if len(present) > 1 else float("nan")
        )
    else:
        targets = targets.reshape(len(targets), -1)
        values = [
            binary_metrics(targets[:, k], probabilities[:, k])["auroc"]
            for k in range(targets.shape[1])
            if len(np.unique(targets[:, k])) > 1
        ]
        value = float(np.mean(values)) if values else float("nan")
    if not np.isfinite(value):
        warnings.warn(
            "validation AUROC is undefined (one class only among the validation cases); logged as 0", stacklevel=2
        )
        return 0.0
    return float(value)
