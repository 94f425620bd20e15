"""The pretraining LightningModule: CT-FM encoder + projection head + contrastive loss.

CT-FM's pretraining (docs/recipe.md): views [B, N, 2, 1, D, H, W] -> encoder -> average of the stride-16 map
(512-d) -> projection head Linear(512, 256) -> ReLU -> Linear(256, 128) -> loss (intra-sample
NT-Xent, tau = 0.1). The loss is any name of :data:`ctfm.pretrain.losses.LOSSES`; a loss that
``needs_prediction`` (SimSiam) gets a prediction head on the projections as well. The optimiser
is the run's :class:`~ctfm.runs.OptimizerConfig` (ct-fm: AdamW lr 1e-4, weight decay 1e-6; MONAI
WarmupCosineSchedule stepped per epoch: 10 warm-up epochs, then cosine to 0 over max_epochs).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ctfm.errors import CTInputError, optional_import
from ctfm.models import create_model
from ctfm.pretrain.config import PretrainConfig
from ctfm.pretrain.losses import build_loss
from ctfm.runs import OptimizerConfig, RunFolder, warmup_cosine_optimizer

L = optional_import("lightning", "train")


class ProjectionHead(nn.Sequential):
    """[*, dim] -> [*, out]: Linear(dim, hidden) -> ReLU -> Linear(hidden, out) (SimCLR's head)."""

    def __init__(self, dim: int = 512, hidden: int = 256, out: int = 128):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class PredictionHead(nn.Module):
    """[*, dim] -> [*, dim]: Linear(dim, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, dim).

    SimSiam's predictor (Chen and He, CVPR 2021; lightly's ``SimSiamPredictionHead``), with the
    paper's 4:1 bottleneck (hidden = dim / 4) by default; leading dims are flattened for the norm.
    """

    def __init__(self, dim: int = 128, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(1, dim // 4)
        self.layers = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z.reshape(-1, z.shape[-1])).reshape(z.shape)


class ContrastivePretrainer(L.LightningModule):
    """Encoder + projection head (+ prediction head) trained by a contrastive loss.

    ``optimizer``: an :class:`~ctfm.runs.OptimizerConfig` (or its mapping, as saved in a
    checkpoint's hyperparameters); None: the ct-fm recipe's.
    """

    def __init__(
        self,
        model: str = "ct-fm",
        model_kwargs: dict | None = None,
        loss: str = "intrasample_ntxent",
        loss_kwargs: dict | None = None,
        optimizer: OptimizerConfig | dict | None = None,
        projection: tuple[int, int] = (256, 128),
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        optimizer = OptimizerConfig.of(optimizer or PretrainConfig().optimizer())
        self.save_hyperparameters({"optimizer": optimizer.to_dict()})
        self.criterion = build_loss(loss, **(loss_kwargs or {}))  # an unknown name fails before the model is built
        self.encoder = create_model(model, **(model_kwargs or {}))
        self.projection_head = ProjectionHead(self.encoder.embedding_dim, *projection)
        self.prediction_head = (
            PredictionHead(projection[-1]) if getattr(self.criterion, "needs_prediction", False) else None
        )

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """[B, N, 2, 1, D, H, W] -> projections [B, N, 2, out]."""
        b, n, v = views.shape[:3]
        flat = views.reshape(b * n * v, *views.shape[3:])
        return self.projection_head(self.encoder.embed(flat)).reshape(b, n, v, -1)

    def loss(self, views: torch.Tensor) -> torch.Tensor:
        """[B, N, 2, 1, D, H, W] -> the scalar loss of the projections (and predictions, for SimSiam)."""
        z = self(views)
        if self.prediction_head is None:
            return self.criterion(z)
        return self.criterion(z, self.prediction_head(z))

    def training_step(self, views: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(views)
        if not torch.isfinite(loss):
            # Stop at once: a non-finite loss poisons every weight at the next optimiser step.
            precision = getattr(getattr(self, "trainer", None), "precision", "?") if self._trainer is not None else "?"
            fix = f"use precision 32-true or a lower lr; resume from {RunFolder.CHECKPOINTS}/{RunFolder.LAST}"
            problem = f"training diverged: non-finite loss at step {self.global_step} (precision {precision})"
            raise CTInputError(None, problem, fix)
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=views.shape[0]
        )
        return loss

    def configure_optimizers(self):
        return warmup_cosine_optimizer(self.parameters(), self.hparams.optimizer)
