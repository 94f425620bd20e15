"""``python -m ctfm`` is the ``ctfm`` command."""

from ctfm.cli import entry

entry()
