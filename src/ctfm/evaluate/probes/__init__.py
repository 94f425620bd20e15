"""Probes on a store's embeddings: logistic, kNN and MLP probes with grouped splits (``probe``) and the ``ctfm probe`` run (``probe_run``)."""
