"""The listening DICOM node (``ctfm listen``): a C-STORE SCP that embeds, predicts and sends each
series it receives; see :mod:`ctfm.node.listener` and docs/pacs.md."""

from ctfm.node.listener import ListenSummary, Node, NodeConfig, listen

__all__ = ["ListenSummary", "Node", "NodeConfig", "listen"]
