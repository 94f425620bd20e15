"""DICOMweb: QIDO-RS to find series, WADO-RS to retrieve them (dicomweb-client on a requests session).

Every request goes through :func:`call`: a dropped connection, a timeout, an HTTP 429 or 5xx is
retried with backoff, then becomes a one-line :class:`CTInputError` naming the endpoint; a 401/403
says the credentials were refused. TLS uses the system trust store unless ``--ca-file`` names one,
and certificate checks are never turned off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ctfm.errors import CTInputError, one_line, optional_import
from ctfm.io.pacs.options import PacsOptions, redact
from ctfm.io.pacs.url import PacsURL

FEATURE = "DICOMweb sources (dicomweb:)"
SERIES_FIELDS = ["NumberOfSeriesRelatedInstances", "Modality", "SeriesDescription", "StudyDate"]


@dataclass(frozen=True)
class SeriesInfo:
    """One series a query found: its UIDs, modality and instance count."""

    study_uid: str
    series_uid: str
    modality: str
    n_instances: int | None
    description: str = ""


def _value(item: dict, tag: str, default=None):
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else default


def session_for(options: PacsOptions):
    requests = optional_import("requests", "pacs", FEATURE)
    session = requests.Session()
    session.verify = options.ca_file or True
    if options.user is not None:
        session.auth = (options.user, options.password or "")
    if options.token is not None:
        session.headers["Authorization"] = f"Bearer {options.token}"
    adapter = _TimeoutAdapter(requests, options.timeout_s, options.ca_file)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _TimeoutAdapter(requests, timeout_s: float, ca_file: str | None):
    class TimeoutAdapter(requests.adapters.HTTPAdapter):
        def send(self, request, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout_s
            if ca_file is not None:  # requests lets $REQUESTS_CA_BUNDLE override session.verify: --ca-file wins
                kwargs["verify"] = ca_file
            return super().send(request, **kwargs)

    return TimeoutAdapter()


def client_for(url: PacsURL, options: PacsOptions):
    dwc = optional_import("dicomweb_client.api", "pacs", FEATURE)
    client = dwc.DICOMwebClient(url=url.base, session=session_for(options))
    client.set_http_retry_params(retry=False)  # ctfm retries, with its own bound and messages
    return client


def call(url: PacsURL, options: PacsOptions, what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, retried on transient faults; any fault ends as a CTInputError."""
    requests = optional_import("requests", "pacs", FEATURE)
    attempts = options.retries + 1
    wait = options.backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.HTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if status in (401, 403):
                raise CTInputError(
                    url.endpoint,
                    f"{what}: the PACS refused the credentials (HTTP {status})",
                    "check --user and --password-file, or --token-file",
                ) from None
            if status == 404:
                raise CTInputError(
                    url, f"{what}: not found on the PACS (HTTP 404)", "check the address and the UIDs"
                ) from None
            if status is None or not (status == 429 or status >= 500) or attempt == attempts:
                problem = f"{what}: HTTP {status}" + (f" after {attempt} attempts" if attempt > 1 else "")
                raise CTInputError(url.endpoint, problem, "check the PACS's log; try again later") from None
        except requests.exceptions.SSLError as exc:
            raise CTInputError(
                url.endpoint,
                f"{what}: TLS certificate check failed ({redact(one_line(exc, 120), options)})",
                "give the PACS's CA bundle with --ca-file",
            ) from None
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            if attempt == attempts:
                kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
                raise CTInputError(
                    url.endpoint,
                    f"{what}: {kind} after {attempts} attempts",
                    "check the address and that the PACS is running and reachable",
                ) from None
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _qido_filters(query: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in query.items() if v != ""}


def find_series(url: PacsURL, options: PacsOptions) -> list[SeriesInfo]:
    """The series an address names (the archive, a study, one series), filtered by ``options.query``."""
    client = client_for(url, options)
    filters = _qido_filters(options.query)
    if url.series_uid:
        filters["SeriesInstanceUID"] = url.series_uid
    found = call(
        url,
        options,
        "QIDO series query",
        client.search_for_series,
        study_instance_uid=url.study_uid,
        search_filters=filters,
        fields=SERIES_FIELDS,
        get_remaining=True,
    )
    out = []
    for item in found:
        count = _value(item, "00201209")
        out.append(
            SeriesInfo(
                study_uid=str(_value(item, "0020000D", url.study_uid or "")),
                series_uid=str(_value(item, "0020000E", "")),
                modality=str(_value(item, "00080060", "")),
                n_instances=int(count) if count not in (None, "") else None,
                description=str(_value(item, "0008103E", "")),
            )
        )
    return [s for s in out if s.series_uid]


def instance_uids(url: PacsURL, options: PacsOptions) -> list[str]:
    client = client_for(url, options)
    found = call(
        url,
        options,
        "QIDO instance query",
        client.search_for_instances,
        study_instance_uid=url.study_uid,
        series_instance_uid=url.series_uid,
        get_remaining=True,
    )
    return [str(_value(item, "00080018")) for item in found if _value(item, "00080018")]


def retrieve_series(url: PacsURL, options: PacsOptions, save, have: set[str]) -> None:
    """WADO-RS: every instance of ``url``'s series through ``save(dataset)``; one streamed request
    when nothing is cached yet, else only the instances not in ``have`` (a resumed retrieval)."""
    client = client_for(url, options)

    def stream():
        for ds in client.iter_series(url.study_uid, url.series_uid):
            if str(ds.SOPInstanceUID) not in have:
                save(ds)
                have.add(str(ds.SOPInstanceUID))

    if not have:
        call(url, options, "WADO series retrieval", stream)
        return
    for sop in instance_uids(url, options):
        if sop not in have:
            ds = call(
                url, options, "WADO instance retrieval", client.retrieve_instance, url.study_uid, url.series_uid, sop
            )
            save(ds)
            have.add(sop)
