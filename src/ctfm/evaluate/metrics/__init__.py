"""Metrics shared by every evaluation: the bootstrap engine and paired tests (``stats``), classification scores (``classification``) and segmentation scores (``segmentation``)."""
