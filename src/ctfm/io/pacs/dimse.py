"""DIMSE: C-FIND to find series, C-GET (or C-MOVE to ctfm's own storage SCP) to retrieve them (pynetdicom).

An association that cannot be made is retried with backoff, then becomes a one-line
:class:`CTInputError` naming the endpoint; a rejected association names the reason (an unknown
calling or called AE title) and is not retried.
"""

from __future__ import annotations

import threading
import time

from ctfm.errors import CTInputError, optional_import
from ctfm.io.pacs.dicomweb import SeriesInfo
from ctfm.io.pacs.options import PacsOptions
from ctfm.io.pacs.url import PacsURL

FEATURE = "DIMSE sources (dimse://)"
# DICOM PS3.8 A-ASSOCIATE-RJ reasons, as a user reads them
_REJECT = {
    (1, 2): "the PACS does not know ctfm's calling AE title",
    (1, 3): "the PACS does not answer to this called AE title",
    (1, 7): "the PACS does not answer to this called AE title",
}
STORAGE_CLASSES = (
    "CTImageStorage",
    "EnhancedCTImageStorage",
    "LegacyConvertedEnhancedCTImageStorage",
    "SecondaryCaptureImageStorage",
    "MRImageStorage",
    "SegmentationStorage",
    "Comprehensive3DSRStorage",
    "RTStructureSetStorage",
)


def _pynetdicom():
    return optional_import("pynetdicom", "pacs", FEATURE)


def associate(ae, url: PacsURL, options: PacsOptions, what: str, **kwargs):
    """An established association with the PACS, retried on refused or dropped connections."""
    wait = options.backoff_s
    attempts = options.retries + 1
    for attempt in range(1, attempts + 1):
        assoc = ae.associate(url.host, url.port, ae_title=url.aet, **kwargs)
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            rej = assoc.acceptor.primitive
            reason = _REJECT.get(
                (int(getattr(rej, "source", 0) or 0), int(getattr(rej, "reason_diagnostic", 0) or 0)),
                "the PACS rejected the association",
            )
            raise CTInputError(
                url.endpoint,
                f"{what}: association rejected ({reason}; calling AE {options.calling_aet})",
                "register ctfm's AE title (--calling-aet) at the PACS, or check the AE title in the address",
            )
        if attempt == attempts:
            raise CTInputError(
                url.endpoint,
                f"{what}: no association after {attempts} attempts (connection refused, dropped or timed out)",
                "check the host, the port and that the PACS is running",
            )
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _application_entity(options: PacsOptions):
    pn = _pynetdicom()
    ae = pn.AE(ae_title=options.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = options.timeout_s
    return ae


def find_series(url: PacsURL, options: PacsOptions) -> list[SeriesInfo]:
    """C-FIND (Study Root, SERIES level) for the series the address names, filtered by the query."""
    pn = _pynetdicom()
    from pydicom.dataset import Dataset

    ae = _application_entity(options)
    ae.add_requested_context(pn.sop_class.StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = url.study_uid or ""
    query.SeriesInstanceUID = url.series_uid or ""
    query.Modality = ""
    query.SeriesDescription = ""
    query.NumberOfSeriesRelatedInstances = ""
    for key, value in options.query.items():
        setattr(query, key, value)
    assoc = associate(ae, url, options, "C-FIND")
    out, failed = [], None
    try:
        for status, identifier in assoc.send_c_find(query, pn.sop_class.StudyRootQueryRetrieveInformationModelFind):
            if status is None:
                failed = "the connection dropped during C-FIND"
                break
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                count = identifier.get("NumberOfSeriesRelatedInstances", "")
                out.append(
                    SeriesInfo(
                        study_uid=str(identifier.get("StudyInstanceUID", "")),
                        series_uid=str(identifier.get("SeriesInstanceUID", "")),
                        modality=str(identifier.get("Modality", "")),
                        n_instances=int(count) if str(count).strip() else None,
                        description=str(identifier.get("SeriesDescription", "")),
                    )
                )
            elif code != 0x0000:
                failed = f"C-FIND failed with status 0x{code:04X}"
    finally:
        assoc.release()
    if failed:
        raise CTInputError(url.endpoint, failed, "check the PACS's log; try again later")
    return [s for s in out if s.series_uid]


def _store_handler(save, lock):
    def handle(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with lock:
            save(ds)
        return 0x0000

    return handle


def retrieve_series(url: PacsURL, options: PacsOptions, save, have: set[str]) -> None:
    """C-GET (or C-MOVE) of the series; each instance through ``save(dataset)``."""
    pn = _pynetdicom()
    from pydicom.dataset import Dataset

    lock = threading.Lock()

    def keep(ds):
        if str(ds.SOPInstanceUID) not in have:
            save(ds)
            have.add(str(ds.SOPInstanceUID))

    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = url.study_uid
    query.SeriesInstanceUID = url.series_uid
    handlers = [(pn.evt.EVT_C_STORE, _store_handler(keep, lock))]
    ae = _application_entity(options)
    if options.retrieve == "get":
        model = pn.sop_class.StudyRootQueryRetrieveInformationModelGet
        ae.add_requested_context(model)
        roles = []
        for name in STORAGE_CLASSES:
            uid = getattr(pn.sop_class, name)
            ae.add_requested_context(uid)
            roles.append(pn.build_role(uid, scp_role=True))
        assoc = associate(ae, url, options, "C-GET", ext_neg=roles, evt_handlers=handlers)
        responses = lambda: assoc.send_c_get(query, model)  # noqa: E731
        server = None
    else:
        model = pn.sop_class.StudyRootQueryRetrieveInformationModelMove
        ae.add_requested_context(model)
        for name in STORAGE_CLASSES:
            ae.add_supported_context(getattr(pn.sop_class, name))
        server = ae.start_server(("127.0.0.1", options.move_port), block=False, evt_handlers=handlers)
        assoc = associate(ae, url, options, "C-MOVE")
        responses = lambda: assoc.send_c_move(query, options.calling_aet, model)  # noqa: E731
    failed = None
    try:
        for status, _ in responses():
            if status is None:
                failed = "the connection dropped during retrieval"
                break
            code = int(status.Status)
            if code not in (0x0000, 0xFF00, 0xFF01, 0xB000):
                failed = f"retrieval failed with status 0x{code:04X}"
    finally:
        assoc.release()
        if server is not None:
            server.shutdown()
    if failed:
        raise CTInputError(
            url.endpoint, f"C-{options.retrieve.upper()}: {failed}", "check the PACS's log; try again later"
        )
