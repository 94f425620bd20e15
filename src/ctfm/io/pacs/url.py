"""PACS addresses: ``dicomweb:http(s)://HOST[:PORT]/PREFIX[/studies/S[/series/X]]`` and
``dimse://AET@HOST:PORT[/StudyUID[/SeriesUID]]``, parsed into :class:`PacsURL`.

A PACS address never carries credentials (they come from ``--user``/``--password-file`` or a
token file), so an address can be recorded in a store row, a log line or an error as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from ctfm.errors import CTInputError

DICOMWEB, DIMSE = "dicomweb", "dimse"
PREFIXES = ("dicomweb:", "dimse://")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_AET = re.compile(r"^[ -~]{1,16}$")


def is_pacs_url(text) -> bool:
    """True for a ``dicomweb:`` or ``dimse://`` address (a string; paths are never PACS addresses)."""
    return isinstance(text, str) and text.startswith(PREFIXES)


@dataclass(frozen=True)
class PacsURL:
    """One PACS address: the archive (``scheme``, ``base`` URL or ``aet``/``host``/``port``), optionally
    narrowed to a study and a series."""

    scheme: str  # "dicomweb" | "dimse"
    base: str = ""  # dicomweb: the service root, e.g. http://127.0.0.1:8042/dicom-web
    aet: str = ""  # dimse: the called AE title
    host: str = ""
    port: int = 0
    study_uid: str | None = None
    series_uid: str | None = None

    def __str__(self) -> str:
        if self.scheme == DICOMWEB:
            text = f"dicomweb:{self.base}"
            if self.study_uid:
                text += f"/studies/{self.study_uid}"
                if self.series_uid:
                    text += f"/series/{self.series_uid}"
            return text
        text = f"dimse://{self.aet}@{self.host}:{self.port}"
        if self.study_uid:
            text += f"/{self.study_uid}"
            if self.series_uid:
                text += f"/{self.series_uid}"
        return text

    @property
    def endpoint(self) -> str:
        """The archive without study or series: what a connection error names."""
        return str(replace(self, study_uid=None, series_uid=None))

    def series(self, study_uid: str, series_uid: str) -> PacsURL:
        return replace(self, study_uid=study_uid, series_uid=series_uid)


def parse_pacs_url(text: str) -> PacsURL:
    """Parse a PACS address, or raise :class:`CTInputError` naming the accepted forms."""
    forms = "dicomweb:http(s)://HOST[:PORT]/PREFIX[/studies/UID[/series/UID]] or dimse://AET@HOST:PORT[/STUDY[/SERIES]]"
    if not is_pacs_url(text):
        raise CTInputError(text, "not a PACS address", f"write {forms}")
    if text.startswith("dicomweb:"):
        return _parse_dicomweb(text, forms)
    return _parse_dimse(text, forms)


def _check_uid(text: str, uid: str, what: str) -> str:
    if not _UID.match(uid) or len(uid) > 64:
        raise CTInputError(
            text, f"{what} {uid!r} is not a DICOM UID (digits and dots, at most 64)", "copy the UID exactly"
        )
    return uid


def _parse_dicomweb(text: str, forms: str) -> PacsURL:
    url = text[len("dicomweb:") :]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CTInputError(text, "a DICOMweb address needs an http:// or https:// URL with a host", f"write {forms}")
    if parts.username or parts.password:
        raise CTInputError(
            text.split("@")[-1],
            "credentials in a PACS address would be recorded with every result",
            "remove them from the address and give --user with --password-file (or --token-file)",
        )
    if parts.query or parts.fragment:
        raise CTInputError(text, "a DICOMweb address takes no ?query or #fragment", "filter with --query KEY=VALUE")
    try:
        port = parts.port
    except ValueError:
        raise CTInputError(text, "the port is not a number in 1..65535", f"write {forms}") from None
    segments = [s for s in parts.path.split("/") if s]
    study = series = None
    if "studies" in segments:
        i = segments.index("studies")
        rest, segments = segments[i + 1 :], segments[:i]
        if len(rest) not in (1, 3) or (len(rest) == 3 and rest[1] != "series"):
            raise CTInputError(
                text, "after /studies/ comes one StudyInstanceUID, then optionally /series/UID", f"write {forms}"
            )
        study = _check_uid(text, rest[0], "StudyInstanceUID")
        series = _check_uid(text, rest[2], "SeriesInstanceUID") if len(rest) == 3 else None
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    if ":" in (parts.hostname or "") and port is None:
        netloc = f"[{parts.hostname}]"
    base = f"{parts.scheme}://{netloc}" + ("/" + "/".join(segments) if segments else "")
    return PacsURL(DICOMWEB, base=base, host=parts.hostname, port=port or 0, study_uid=study, series_uid=series)


def _parse_dimse(text: str, forms: str) -> PacsURL:
    match = re.match(r"^dimse://([^@/]+)@([^:/]+):([0-9]+)(/[^/]+)?(/[^/]+)?/?$", text)
    if not match:
        raise CTInputError(text, "not a DIMSE address", f"write {forms}")
    aet, host, port, study, series = match.groups()
    if not _AET.match(aet) or aet != aet.strip() or "\\" in aet:
        raise CTInputError(text, f"AE title {aet!r} must be 1..16 printable characters", "use the PACS's AE title")
    port_number = int(port)
    if not 0 < port_number < 65536:
        raise CTInputError(text, f"port {port} is not in 1..65535", "use the PACS's DICOM port")
    return PacsURL(
        DIMSE,
        aet=aet,
        host=host,
        port=port_number,
        study_uid=_check_uid(text, study[1:], "StudyInstanceUID") if study else None,
        series_uid=_check_uid(text, series[1:], "SeriesInstanceUID") if series else None,
    )
