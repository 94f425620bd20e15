"""The CT-FM networks: MONAI's SegResEncoder and SegResNetDS with a stable, typed API.

The classes subclass MONAI's so that parameter names are exactly those of the published
``project-lighter`` weights (``conv_init.weight``, ``layers.0.blocks.0.norm1.weight``, ...):
a state dict moves between ctfm, MONAI and lighter-zoo without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNetDS
from monai.networks.nets.segresnet_ds import SegResEncoder

CT_FM_ARCH = {"spatial_dims": 3, "in_channels": 1, "init_filters": 32, "blocks_down": (1, 2, 2, 4, 4)}


class CTEncoder(SegResEncoder):
    """SegResEncoder returning multi-scale features; ``embed`` pools the last one.

    ``forward(x)``: x [B, 1, D, H, W] -> list of 5 maps [B, 32*2^i, D/2^i, H/2^i, W/2^i]
    (strides 1, 2, 4, 8, 16), in train and eval mode alike (no head module).
    ``embed(x)``: [B, 512], the global average of the stride-16 map (CT-FM's embedding).
    """

    def __init__(
        self, spatial_dims: int = 3, in_channels: int = 1, init_filters: int = 32, blocks_down=(1, 2, 2, 4, 4), **kwargs
    ):
        if kwargs.get("head_module") is not None:
            raise ValueError(
                "CTEncoder returns all feature maps; use embed() or a head outside the encoder, not head_module"
            )
        kwargs.pop("head_module", None)
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            init_filters=init_filters,
            blocks_down=tuple(blocks_down),
            **kwargs,
        )

    @property
    def feature_channels(self) -> list[int]:
        return [self.init_filters * 2**i for i in range(len(self.blocks_down))]

    @property
    def embedding_dim(self) -> int:
        return self.feature_channels[-1]

    @property
    def total_stride(self) -> int:
        return 2 ** (len(self.blocks_down) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._forward(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return pool_embedding(self.forward(x)[-1])

    def arch_config(self) -> dict:
        """Constructor kwargs, as in the published config.json."""
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "init_filters": self.init_filters,
            "blocks_down": list(self.blocks_down),
        }


class CTSegResNet(SegResNetDS):
    """SegResNetDS whose ``encoder`` is CT-FM's (keys ``encoder.*`` as in ct_fm_segresnet)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        init_filters: int = 32,
        blocks_down=(1, 2, 2, 4, 4),
        dsdepth: int = 4,
        **kwargs,
    ):
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            init_filters=init_filters,
            blocks_down=tuple(blocks_down),
            dsdepth=dsdepth,
            **kwargs,
        )

    def arch_config(self) -> dict:
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "init_filters": self.init_filters,
            "blocks_down": list(self.blocks_down),
            "dsdepth": self.dsdepth,
        }


def pool_embedding(last_map: torch.Tensor) -> torch.Tensor:
    """[B, C, d, h, w] -> [B, C]: ``adaptive_avg_pool3d(x, 1).flatten(1)`` as CT-FM computes it."""
    return F.adaptive_avg_pool3d(last_map, 1).flatten(1)
