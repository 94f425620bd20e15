"""Results back into the study: STOW-RS to a DICOMweb address, C-STORE to a DIMSE node.

``--send DEST`` on ``ctfm predict seg``: the DICOM SEG and its TID 1500 measurement report
(:mod:`ctfm.predict.sr`) go to DEST, with UIDs derived from the source series and the weights,
so a second send of the same result adds nothing. Connection faults are retried within the
bound of the PACS options, then reported in one line naming DEST; a refused object is an error,
never a silent success.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from ctfm.errors import CTInputError, optional_import
from ctfm.io.pacs import PacsURL, current_options, parse_pacs_url
from ctfm.io.pacs.dicomweb import call, client_for
from ctfm.io.pacs.dimse import associate
from ctfm.predict.sr import fit_lengths, measurement_report
from ctfm.predict.writers import dicom_seg_source
from ctfm.runtime import atomic_path

FEATURE = "sending results to a PACS (--send)"
SR_SUFFIX = ".sr.dcm"


def parse_destination(text: str) -> PacsURL:
    """A ``--send`` destination: a DICOMweb service root or a DIMSE node, without study or series."""
    url = parse_pacs_url(text)
    if url.study_uid:
        raise CTInputError(
            text, "a --send destination names the archive, not a study or series", f"give {url.endpoint}"
        )
    return url


def check_destination(dest: PacsURL, options=None) -> None:
    """A cheap request (QIDO of one study, or C-ECHO) so that an unreachable or refusing
    destination is reported before any prediction runs."""
    options = options or current_options()
    if dest.scheme == "dicomweb":
        client = client_for(dest, options)
        call(dest, options, "QIDO check of the --send destination", client.search_for_studies, limit=1)
        return
    pn = optional_import("pynetdicom", "pacs", FEATURE)
    ae = pn.AE(ae_title=options.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = options.timeout_s
    ae.add_requested_context(pn.sop_class.Verification)
    assoc = associate(ae, dest, options, "C-ECHO")
    try:
        assoc.send_c_echo()
    finally:
        assoc.release()


def send_datasets(dest: PacsURL, datasets, options=None) -> int:
    """Store ``datasets`` at ``dest``; returns how many were sent."""
    options = options or current_options()
    if dest.scheme == "dicomweb":
        client = client_for(dest, options)
        call(dest, options, "STOW-RS", client.store_instances, datasets=list(datasets))
        return len(datasets)
    pn = optional_import("pynetdicom", "pacs", FEATURE)
    ae = pn.AE(ae_title=options.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = options.timeout_s
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = associate(ae, dest, options, "C-STORE")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = None if status is None else int(getattr(status, "Status", -1))
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                what = "the connection dropped" if code is None else f"status 0x{code:04X}"
                raise CTInputError(dest.endpoint, f"C-STORE of {ds.SOPClassUID.name}: {what}", "check the PACS's log")
    finally:
        assoc.release()
    return len(datasets)


def send_prediction(dest: str | PacsURL, seg_path: Path, rows: list[dict], source, provenance: dict, options=None):
    """Write the SR of the SEG at ``seg_path`` beside it (``<name>.sr.dcm``) and send both to
    ``dest``; ``source`` is the local series the SEG references."""
    dest = dest if isinstance(dest, PacsURL) else parse_destination(dest)
    headers = [fit_lengths(ds) for ds in dicom_seg_source(source).datasets]  # blank UIDs derived, as in the SEG
    seg = pydicom.dcmread(seg_path)
    sha = str(provenance.get("weights_sha256") or "")
    sr_bytes = measurement_report(seg, headers, rows, sha, str(provenance.get("model") or "ctfm"))
    sr_path = seg_path.with_name(seg_path.name[: -len(".dcm")] + SR_SUFFIX)
    with atomic_path(sr_path) as tmp:
        tmp.write_bytes(sr_bytes)
    sr = pydicom.dcmread(sr_path)
    return send_datasets(dest, [seg, sr], options)
