"""Fine-tuning: task-agnostic run plumbing (:mod:`ctfm.finetune.run`), segmentation
(:mod:`ctfm.finetune.seg`) and its label data adapters (:mod:`ctfm.finetune.data`)."""
