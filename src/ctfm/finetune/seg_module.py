"""The segmentation fine-tuning LightningModule: SegResNetDS (CT-FM encoder), deep-supervision Dice + CE.

Training: image [B, 1, D, H, W] -> the 4 deep-supervision outputs (full resolution first) ->
``DeepSupervisionLoss(DiceCELoss(softmax, one-hot target, background included, squared
prediction, smooth_nr 0, smooth_dr 1e-5))``. Validation: Gaussian sliding window over each
validation volume, argmax, per-class Dice (background excluded, empty truth ignored: MONAI
``DiceMetric(ignore_empty=True)``), logged as ``val/dice/<class>`` and ``val/macro_dice``
(the mean over classes of the per-class means over cases).
"""

from __future__ import annotations

import torch

from ctfm.finetune.module import FinetuneModule
from ctfm.models.segmentation import load_segmentation_model
from ctfm.runs import OptimizerConfig


class SegmentationFinetuner(FinetuneModule):
    def __init__(
        self,
        class_names: list[str],
        model_kwargs: dict | None = None,
        encoder_weights: str | None = None,
        init_weights: str | None = None,
        seed: int = 0,
        freeze: list[str] | None = None,
        freeze_until_epoch: int = -1,
        optimizer: OptimizerConfig | dict | None = None,
        roi_size: list[int] | None = None,
        sw_batch_size: int = 2,
        sw_overlap: float = 0.625,
        deep_supervision_weights: str = "exp",
    ):
        super().__init__()
        self.save_run_hyperparameters(optimizer)
        from monai.losses import DeepSupervisionLoss, DiceCELoss
        from monai.metrics import DiceMetric

        labels = dict(enumerate(class_names))
        source = init_weights or encoder_weights
        self.model = load_segmentation_model(source, labels=labels, seed=seed, **(model_kwargs or {})).model
        self.model.train()
        self.criterion = DeepSupervisionLoss(
            DiceCELoss(
                softmax=True,
                to_onehot_y=True,
                include_background=True,
                squared_pred=True,
                smooth_nr=0.0,
                smooth_dr=1e-5,
            ),
            weight_mode=deep_supervision_weights,
        )
        self.dice = DiceMetric(
            include_background=False, reduction="none", ignore_empty=True, num_classes=len(class_names)
        )
        self.apply_freeze(0)

    # ---- steps ---------------------------------------------------------------------------
    def forward(self, image: torch.Tensor):
        """[B, 1, D, H, W] -> logits [B, N, D, H, W] (eval) or the list of deep-supervision logits (train)."""
        return self.model(image)

    def training_step(self, batch, batch_idx):
        outputs = self.model(batch["image"])
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        loss = self.criterion(
            list(outputs), batch["label"].float()
        )  # float: the loss resizes the target (nearest) per level
        return self.checked_loss(loss, batch["image"].shape[0])

    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Gaussian sliding window over [B, 1, D, H, W] -> logits [B, N, D, H, W]."""
        from monai.inferers import sliding_window_inference

        hp = self.hparams
        return sliding_window_inference(
            image,
            roi_size=list(hp.roi_size),
            sw_batch_size=hp.sw_batch_size,
            predictor=self.model,
            overlap=hp.sw_overlap,
            mode="gaussian",
        )

    def validation_step(self, batch, batch_idx):
        logits = self.predict_logits(batch["image"])
        prediction = logits.argmax(dim=1, keepdim=True)
        self.dice(y_pred=prediction, y=batch["label"])

    def on_validation_epoch_end(self) -> None:
        per_case = self.dice.aggregate()  # [cases, N-1], NaN where the truth is empty (gathered over ranks)
        self.dice.reset()
        per_class = torch.nanmean(per_case.float(), dim=0)
        for name, value in zip(self.hparams.class_names[1:], per_class.tolist()):
            self.log(f"val/dice/{name}", 0.0 if value != value else value, sync_dist=False, rank_zero_only=False)
        valid = per_class[~torch.isnan(per_class)]
        macro = float(valid.mean()) if valid.numel() else 0.0
        self.log("val/macro_dice", macro, prog_bar=True, sync_dist=False)
