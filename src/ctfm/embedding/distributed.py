"""Bulk embedding past one machine: Lightning DDP over many GPUs / nodes (or CPU processes).

Selected by flags (``ctfm embed ... --devices 4 --strategy ddp [--num-nodes 2]``), never by code
changes. Rank r embeds sources r, r + world, r + 2*world, ... and writes its own part files into
the store (one output shard per rank, merged on read); after a barrier, rank 0 compacts the store.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ctfm.embedding.modes import EmbedOptions
from ctfm.embedding.runner import RunSummary, run_sources
from ctfm.errors import optional_import
from ctfm.io.sources import ScanSource
from ctfm.runtime import rank_and_world_size


class _Sources(Dataset):
    def __init__(self, sources: list[ScanSource]):
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> int:
        return index


class _RankStride(Sampler):
    """Indices rank, rank + world, ...: every source exactly once over all ranks (no padding
    duplicates, unlike DistributedSampler). The rank is read when iteration starts, after DDP
    has been set up."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        rank, world = rank_and_world_size(environment=False)
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = rank_and_world_size(environment=False)
        return len(range(rank, self.n, world))


def _first(batch):
    return batch[0]


def run_distributed(
    sources: list[ScanSource],
    encoder,
    model_name: str,
    options: EmbedOptions,
    store,
    trainer_kwargs: dict,
    progress: bool = False,
) -> RunSummary | None:
    """Embed ``sources`` with Lightning's ``Trainer.predict`` under the given strategy.

    ``sources`` must be the same list on every rank (the caller filters finished scans before
    the ranks start writing, see :func:`ctfm.embedding.runner.pending_sources`).

    Returns the merged summary on global rank 0 and ``None`` on the other ranks.
    """
    import logging
    import time
    import warnings

    L = optional_import("lightning", "train", "embedding on several devices or nodes")

    # Lightning's banners and tips are noise in a batch job's output; errors still show.
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    started = time.perf_counter()

    class EmbedModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.summary = RunSummary()

        def predict_step(self, index, batch_idx):
            source = sources[int(index)]
            # The per-scan work is the same as on one machine; each rank writes its own parts.
            one = run_sources(
                [source],
                self.encoder,
                model_name,
                options,
                store,
                writer=f"r{self.global_rank}",
                progress=False,
                skip_done=False,
            )
            self.summary.done += one.done
            self.summary.skipped += one.skipped
            self.summary.failed += one.failed
            return None

    module = EmbedModule()
    loader = DataLoader(
        _Sources(sources), batch_size=1, sampler=_RankStride(len(sources)), collate_fn=_first, num_workers=0
    )
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,
        inference_mode=True,
        **trainer_kwargs,
    )
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    summaries = [module.summary]
    strategy = trainer.strategy
    _, world = rank_and_world_size(environment=False)
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(
            gathered, (module.summary.done, module.summary.skipped, module.summary.failed)
        )
        summaries = [RunSummary(done=d, skipped=s, failed=f) for d, s, f in gathered]
    strategy.barrier()
    if trainer.global_rank != 0:
        return None
    store.compact()
    merged = RunSummary(seconds=time.perf_counter() - started)
    for s in summaries:
        merged.done += s.done
        merged.skipped += s.skipped
        merged.failed += s.failed
    return merged
