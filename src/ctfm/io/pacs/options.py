"""How ctfm talks to a PACS: AE titles, filters, credentials, TLS, retries and the series cache.

:class:`PacsOptions` holds them; :func:`use_options` makes a set current for the code that expands
and loads PACS addresses (``discover_inputs``, ``load_ct``), so every verb that takes a path takes
a PACS address with the same options. Passwords and tokens are read from files and never appear
in a ``repr``, a log line, an error or a store row.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ctfm.errors import CTInputError, OptionError

DEFAULT_CACHE_GB = 20.0
# QIDO attribute keywords a --query may name (standard DICOM keywords at series or study level).
QUERY_KEYWORDS = (
    "Modality",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "SeriesDescription",
    "SeriesDate",
    "BodyPartExamined",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "Manufacturer",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyID",
)


def default_cache_dir() -> Path:
    """``$CTFM_PACS_CACHE``, else ``$XDG_CACHE_HOME/ctfm/pacs``, else ``~/.cache/ctfm/pacs``."""
    if os.environ.get("CTFM_PACS_CACHE"):
        return Path(os.environ["CTFM_PACS_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ctfm" / "pacs"


@dataclass
class PacsOptions:
    """Options of every PACS connection of a run (see docs/pacs.md)."""

    calling_aet: str = "CTFM"
    query: dict[str, str] = field(default_factory=dict)  # QIDO / C-FIND filters; Modality defaults to CT
    cache_dir: Path | None = None
    cache_gb: float = DEFAULT_CACHE_GB
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    timeout_s: float = 30.0
    retries: int = 3  # extra attempts after a dropped connection, a 5xx or a timeout
    backoff_s: float = 0.5  # first wait; doubled at each retry
    retrieve: str = "get"  # DIMSE: "get" (C-GET) or "move" (C-MOVE to ctfm's own SCP)
    move_port: int = 0  # DIMSE C-MOVE: the port of ctfm's own storage SCP (0: a free one)

    def __post_init__(self):
        if self.retrieve not in ("get", "move"):
            raise OptionError(f"--retrieve {self.retrieve!r}: choose get (C-GET) or move (C-MOVE)")
        if self.cache_gb <= 0:
            raise OptionError(f"--cache-gb {self.cache_gb}: must be > 0")
        if not 1 <= len(self.calling_aet) <= 16:
            raise OptionError(f"--calling-aet {self.calling_aet!r}: an AE title has 1..16 characters")
        if self.password is not None and self.user is None:
            raise OptionError("--password-file needs --user NAME")
        if self.token is not None and self.user is not None:
            raise OptionError("give either --user with --password-file or --token-file, not both")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise CTInputError(
                self.ca_file, "no such CA bundle file", "give a PEM file of the PACS's certificate authority"
            )
        self.query = {**{"Modality": "CT"}, **dict(self.query)}

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()

    @property
    def secrets(self) -> list[str]:
        """The secret strings, to keep out of every message."""
        return [s for s in (self.password, self.token) if s]


def parse_query(items) -> dict[str, str]:
    """``["Modality=CT", "StudyDate=20240101-20241231"]`` -> a dict; unknown keywords refused."""
    query: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"--query {item!r}: write KEYWORD=VALUE, e.g. --query StudyDate=20240101-20241231")
        if key not in QUERY_KEYWORDS:
            raise OptionError(f"--query {key}: not a DICOM keyword ctfm queries; known: {', '.join(QUERY_KEYWORDS)}")
        if key.endswith("Date") and value and not re.match(r"^\d{8}(-\d{8})?$|^-\d{8}$|^\d{8}-$", value):
            raise OptionError(f"--query {key}={value}: dates are YYYYMMDD or YYYYMMDD-YYYYMMDD")
        query[key] = value
    return query


def read_secret(path, what: str) -> str:
    """The first line of a secret file (a password or a bearer token), stripped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CTInputError(
            path, f"cannot read the {what} file ({exc.strerror or type(exc).__name__})", "check the path"
        ) from None
    lines = text.splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise CTInputError(path, f"the {what} file is empty", f"write the {what} on its first line")
    return secret


_CURRENT: list[PacsOptions] = []


def current_options() -> PacsOptions:
    """The options made current by :func:`use_options`, else the defaults."""
    return _CURRENT[-1] if _CURRENT else PacsOptions()


@contextlib.contextmanager
def use_options(options: PacsOptions):
    """Make ``options`` current for PACS addresses expanded or loaded inside the block."""
    _CURRENT.append(options)
    try:
        yield options
    finally:
        _CURRENT.remove(options)


def redact(text: str, options: PacsOptions | None = None) -> str:
    """``text`` with every secret of ``options`` replaced by ``***``."""
    for secret in (options or current_options()).secrets:
        text = text.replace(secret, "***")
    return text
