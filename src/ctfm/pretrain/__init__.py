"""Self-supervised pre-training of CT foundation models (docs/recipe.md, Pretraining).

Blocks, each testable alone: ``losses`` (intra-sample NT-Xent and the ablation family),
``views`` (15 crops x 2 views with CT-FM's augmentations), ``cache`` (preprocess once, read only
the crops), ``cohort`` (IDC and local manifests), ``data`` (deterministic samples per step),
``module`` (encoder + projection head as a LightningModule), ``config`` and ``train`` (the run).
Importing :mod:`ctfm.models` never needs this package or Lightning.
"""
