"""Training data for pretraining: views drawn from the preprocessed cache, deterministic per step.

A training sample is identified by (epoch, index). Its scan and its random state are pure
functions of (seed, epoch, index), so a run resumed from a checkpoint sees exactly the samples an
uninterrupted run would have seen, and DDP ranks draw disjoint indices without coordination.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ctfm.errors import OptionError
from ctfm.pretrain.views import MultiCropViews, sample_state


class ViewsDataset(Dataset):
    """(epoch, index) -> views [num_crops, 2, 1, D, H, W] of one cached scan.

    Scans are visited in a fresh random order each epoch (a permutation seeded by seed and epoch).
    """

    def __init__(self, cache, views: MultiCropViews, seed: int = 0):
        if len(cache) == 0:
            raise OptionError("the cache holds no scans: build it with `ctfm cohort cache` or check the data path")
        self.cache = cache
        self.views = views
        self.seed = seed

    def scan_for(self, epoch: int, index: int) -> int:
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.cache))
        return int(order[index % len(self.cache)])

    def __len__(self) -> int:  # indices come from the sampler; this is one pass over the scans
        return len(self.cache)

    def __getitem__(self, key) -> torch.Tensor:
        epoch, index = key
        scan = self.scan_for(epoch, index)
        state = sample_state(self.seed, epoch, index)
        return self.views(self.cache.shape(scan), lambda start, size: self.cache.read_crop(scan, start, size), state)
