"""Uploaded scans: size and type checked, written under the server's own folder with generated names.

Two kinds are accepted: a NIfTI file (``.nii`` or ``.nii.gz``, checked by its header, not its
name alone) and a zip of one DICOM series. A zip member whose name is absolute, contains ``..``,
is a link, or would unpack past the size limit is refused before anything is written; members are
written under generated names (the DICOM reader finds the series by content), so no name from the
request ever becomes a path.
"""

from __future__ import annotations

import shutil
import stat
import struct
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

from ctfm.errors import CTInputError

UNPACKED_LIMIT_FACTOR = 8  # a zip may unpack to at most this many times the upload limit


class UploadRefused(CTInputError):
    """An upload that is refused before it is embedded; ``status`` is the HTTP code to answer."""

    def __init__(self, name: str, problem: str, fix: str, status: int = 400):
        super().__init__(name, problem, fix)
        self.status = status


def sniff_kind(head: bytes, filename: str) -> str:
    """``"nifti"``, ``"nifti-gz"`` or ``"zip"`` from the first bytes; else :class:`UploadRefused` (415)."""
    name = filename.lower()
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:2] == b"\x1f\x8b":
        try:
            inner = zlib.decompressobj(wbits=31).decompress(head, 1024)
        except zlib.error:
            inner = b""
        if _is_nifti_header(inner):
            return "nifti-gz"
        raise UploadRefused(
            filename,
            "a gzip file that is not a NIfTI image",
            "upload a .nii.gz NIfTI file or a .zip of one DICOM series",
            status=415,
        )
    if _is_nifti_header(head):
        return "nifti"
    kind = (
        "a DICOM file"
        if head[128:132] == b"DICM"
        else f"a file of unknown type ({name.rsplit('.', 1)[-1] if '.' in name else 'no extension'})"
    )
    raise UploadRefused(
        filename,
        f"{kind} is not accepted",
        "upload a NIfTI file (.nii, .nii.gz) or a .zip of one DICOM series",
        status=415,
    )


def _is_nifti_header(data: bytes) -> bool:
    if len(data) < 348:
        return False
    for order in ("<", ">"):
        size = struct.unpack(order + "i", data[:4])[0]
        if size == 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
            return True
        if size == 540 and data[4:8] in (b"n+2\x00", b"ni2\x00"):
            return True
    return False


def unsafe_member(name: str) -> str | None:
    """Why a zip member name may not be unpacked (absolute, ``..``, drive letter), or None."""
    if not name or "\x00" in name:
        return "an empty or NUL-containing name"
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or name.startswith(("/", "\\")):
            return "an absolute path"
        if ".." in pure.parts:
            return "a '..' component"
    return None


def check_zip(path: Path, filename: str, max_unpacked: int) -> list[zipfile.ZipInfo]:
    """The file members of a safe zip; :class:`UploadRefused` for a damaged or unsafe one."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UploadRefused(
            filename, "damaged zip file", "zip the DICOM series folder again and upload the new file"
        ) from None
    with archive:
        members = archive.infolist()
        total = 0
        for info in members:
            why = unsafe_member(info.filename)
            if why is not None:
                raise UploadRefused(
                    filename,
                    f"zip member {info.filename!r} has {why}",
                    "zip the series folder with relative names (e.g. cd into it and run zip -r series.zip .)",
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UploadRefused(
                    filename,
                    f"zip member {info.filename!r} is a symbolic link",
                    "zip the files themselves, without links",
                )
            total += info.file_size
            if total > max_unpacked:
                raise UploadRefused(
                    filename,
                    f"zip unpacks to more than {max_unpacked // 2**20} MiB",
                    "upload a smaller series",
                    status=413,
                )
        files = [m for m in members if not m.is_dir()]
        if not files:
            raise UploadRefused(filename, "the zip holds no files", "zip a folder holding one DICOM series")
        return files


def unpack_zip(path: Path, members: list[zipfile.ZipInfo], folder: Path, max_unpacked: int) -> None:
    """Write ``members`` into ``folder`` as ``00000.dcm``, ``00001.dcm``, ... (sizes enforced as read)."""
    folder.mkdir(parents=True)
    written = 0
    with zipfile.ZipFile(path) as archive:
        for number, info in enumerate(members):
            with archive.open(info) as source, open(folder / f"{number:05d}.dcm", "wb") as target:
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if written > max_unpacked:  # the directory lied about the sizes
                        raise UploadRefused(
                            info.filename,
                            f"zip unpacks to more than {max_unpacked // 2**20} MiB",
                            "upload a smaller series",
                            status=413,
                        )
                    target.write(chunk)


class UploadFolder:
    """The server's own folder for uploads; every upload gets a fresh generated name inside it."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def receive(self, stream, filename: str) -> Path:
        """Copy an upload (a binary file object) into the folder, checked; returns the scan path
        (a ``.nii``/``.nii.gz`` file or a DICOM folder). Nothing is left behind on refusal."""
        self.root.mkdir(parents=True, exist_ok=True)
        stem = uuid.uuid4().hex
        raw = self.root / f".{stem}.upload"
        try:
            size = 0
            with open(raw, "wb") as out:
                while chunk := stream.read(1 << 20):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise UploadRefused(
                            filename,
                            f"upload larger than the limit of {self.max_bytes // 2**20} MiB",
                            "upload a smaller file or start the server with a larger --max-upload-mb",
                            status=413,
                        )
                    out.write(chunk)
            if size == 0:
                raise UploadRefused(filename, "empty upload (0 bytes)", "choose the scan file again")
            with open(raw, "rb") as f:
                head = f.read(1 << 16)
            kind = sniff_kind(head, filename)
            if kind == "zip":
                members = check_zip(raw, filename, self.max_bytes * UNPACKED_LIMIT_FACTOR)
                target = self.root / stem
                try:
                    unpack_zip(raw, members, target, self.max_bytes * UNPACKED_LIMIT_FACTOR)
                except BaseException:
                    shutil.rmtree(target, ignore_errors=True)
                    raise
                raw.unlink()
                return target
            target = self.root / (stem + (".nii.gz" if kind == "nifti-gz" else ".nii"))
            raw.rename(target)
            return target
        finally:
            raw.unlink(missing_ok=True)

    def discard(self, path: Path) -> None:
        """Remove an upload that could not be embedded (only paths inside the folder)."""
        path = Path(path)
        if path.parent != self.root:
            return
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
