"""Uploaded scans: size and type checked, written under the server's own folder with generated names.

Two kinds are accepted: a NIfTI file (``.nii`` or ``.nii.gz``, checked by its header, not its
name alone) and a zip of one DICOM series. A zip member whose name is absolute, contains ``..``,
is a link, or would unpack past the size limit is refused before anything is written; members are
written under generated names (the DICOM reader finds the series by content), so no name from the
request ever becomes a path.

Sizes are checked twice: the bytes sent (``--max-upload-mb``), and the scan they decode to, read
from its headers before anything is decoded: a NIfTI header's dimensions and data type, each
DICOM file's rows, columns, frames and bits. A scan of more than ``--max-voxels`` voxels, or one
whose decoding would not fit in the memory the machine has free, is refused with 413, so a small
gzip or zip whose headers claim a huge image (a decompression bomb) costs the server nothing. A
NIfTI file must also hold as much data as its header says (counted as it decompresses, up to
that size and no further).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import shutil
import stat
import struct
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

import nibabel as nib
import pydicom
from pydicom.errors import InvalidDicomError

from ctfm.app.security import ECHO_LIMIT
from ctfm.errors import CTInputError

UNPACKED_LIMIT_FACTOR = 8  # a zip may unpack to at most this many times the upload limit
MAX_ZIP_MEMBERS = 20_000  # files of one zipped series (a CT series has hundreds, a few thousand at most)
ZIP_ENTRY_BYTES = 512  # bytes a directory entry may take on average (46 + its name and extra fields)
DEFAULT_MAX_VOXELS = 512 * 512 * 2048  # 2^29: a 512 x 512 x 2048 (or 1024 x 1024 x 512) scan
# Memory one voxel costs while an upload is embedded, besides its decoded value: the float32 HU
# volume, the int16 display grid, the preprocessed float32 volume and slack for resampling.
WORKING_BYTES_PER_VOXEL = 16


class UploadRefused(CTInputError):
    """An upload that is refused before it is embedded; ``status`` is the HTTP code to answer."""

    def __init__(self, name: str, problem: str, fix: str, status: int = 400):
        super().__init__(shown_name(name), problem, fix)
        self.status = status


def shown_name(filename: str) -> str:
    """The client's file name as an error message shows it: one line, at most ``ECHO_LIMIT`` characters."""
    name = " ".join(str(filename).split()) or "upload"
    return name if len(name) <= ECHO_LIMIT else f"{name[:ECHO_LIMIT]}... ({len(name)} characters)"


def available_memory() -> int | None:
    """Bytes of memory the machine has free for a new allocation (``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_scan_size(
    filename: str, what: str, voxels: int, nbytes: int, max_voxels: int, available: int | None = None
) -> None:
    """Refuse (413) a scan of more than ``max_voxels`` voxels, or one whose decoding and embedding
    would need more memory than is free (``available``, default :func:`available_memory`)."""
    if voxels > max_voxels:
        raise UploadRefused(
            filename,
            f"{what} describe {voxels:,} voxels, more than the limit of {max_voxels:,} voxels",
            "upload a smaller scan, or start the server with a larger --max-voxels",
            status=413,
        )
    need = nbytes + voxels * WORKING_BYTES_PER_VOXEL
    free = available_memory() if available is None else available
    if free is not None and need > free:
        raise UploadRefused(
            filename,
            f"{what} describe {voxels:,} voxels: embedding them needs about {need / 2**30:.1f} GiB of memory, more "
            f"than the {free / 2**30:.1f} GiB the server has free",
            "upload a smaller scan, or free memory on the server",
            status=413,
        )


def nifti_header(head: bytes, filename: str):
    """The NIfTI-1 or NIfTI-2 header at the start of ``head`` (nibabel), read without the data."""
    size = struct.unpack("<i", head[:4])[0] if len(head) >= 4 else 0
    swapped = struct.unpack(">i", head[:4])[0] if len(head) >= 4 else 0
    klass = nib.Nifti2Header if 540 in (size, swapped) else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(head), check=False)
        shape = tuple(int(n) for n in header.get_data_shape())
        itemsize = int(header.get_data_dtype().itemsize)
        offset = int(header.get_data_offset())
    except Exception:  # nibabel's header errors have no common base; any of them is a damaged header
        raise UploadRefused(
            filename, "damaged NIfTI header (its dimensions or data type cannot be read)", "export the scan again"
        ) from None
    if not shape or any(n < 1 for n in shape) or offset < 0:
        raise UploadRefused(filename, f"NIfTI header with an empty image (shape {shape})", "export the scan again")
    return shape, itemsize, offset


def check_nifti(path: Path, kind: str, filename: str, max_voxels: int) -> None:
    """Refuse a NIfTI upload too large for the server (from its header), or one that holds less
    data than its header says, before its voxels are decoded."""
    if kind == "nifti-gz":
        with gzip.open(path, "rb") as f:
            head = f.read(540)
    else:
        with open(path, "rb") as f:
            head = f.read(540)
    shape, itemsize, offset = nifti_header(head, filename)
    voxels = math.prod(shape)
    check_scan_size(
        filename,
        f"its NIfTI header's dimensions ({' x '.join(map(str, shape))})",
        voxels,
        voxels * itemsize,
        max_voxels,
    )
    need = offset + voxels * itemsize
    have = _data_size(path, kind, need)
    if have < need:
        raise UploadRefused(
            filename,
            f"the file holds {have:,} bytes where its header ({' x '.join(map(str, shape))} voxels of {itemsize} "
            f"bytes) needs {need:,}: it is truncated or its header is wrong",
            "export the scan again and upload the whole file",
        )


def _data_size(path: Path, kind: str, enough: int) -> int:
    """The file's (decompressed) size, counted up to ``enough`` bytes and no further."""
    if kind != "nifti-gz":
        return path.stat().st_size
    count = 0
    try:
        with gzip.open(path, "rb") as f:
            while count < enough and (chunk := f.read(min(1 << 20, enough - count))):
                count += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass  # a damaged or cut stream: what was read is what it holds
    return count


def check_dicom_members(path: Path, members: list[zipfile.ZipInfo], filename: str, max_voxels: int) -> None:
    """Refuse a zipped series too large for the server from its DICOM headers (rows x columns x
    frames x samples, and bits allocated, of every file), read before any pixel is unpacked."""
    voxels = nbytes = 0
    with zipfile.ZipFile(path) as archive:
        for info in members:
            with archive.open(info) as member:
                try:
                    ds = pydicom.dcmread(member, stop_before_pixels=True, defer_size=1024)
                except (InvalidDicomError, EOFError, OSError, ValueError, struct.error, KeyError, TypeError):
                    continue  # not a DICOM file: the series reader ignores it
            try:
                rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                samples = int(ds.get("SamplesPerPixel", 1) or 1)
                bits = int(ds.get("BitsAllocated", 16) or 16)
            except (TypeError, ValueError):
                raise UploadRefused(
                    filename,
                    f"zip member {shown_name(info.filename)!r} has unreadable image dimensions",
                    "zip the series again",
                ) from None
            count = max(rows, 0) * max(cols, 0) * max(frames, 1) * max(samples, 1)
            voxels += count
            nbytes += count * max(1, math.ceil(bits / 8))
    check_scan_size(filename, "its DICOM headers (rows x columns x frames of every file)", voxels, nbytes, max_voxels)


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
        else f"a file of unknown type ({name.rsplit('.', 1)[-1][:20] if '.' in name else 'no extension'})"
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


def zip_directory(path: Path) -> tuple[int, int] | None:
    """``(members, bytes)`` that a zip's end record declares for its central directory (zip64
    too), read from the file's last bytes without parsing the directory; None when there is no
    end record (a damaged zip)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (22 + 65535)))
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        count, directory = struct.unpack("<HI", tail[at + 10 : at + 16])
        if (count == 0xFFFF or directory == 0xFFFFFFFF) and at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":
            f.seek(struct.unpack("<Q", tail[at - 12 : at - 4])[0])
            record = f.read(56)
            if len(record) == 56 and record[:4] == b"PK\x06\x06":
                count, directory = struct.unpack("<QQ", record[32:48])
    return count, directory


def check_zip(path: Path, filename: str, max_unpacked: int) -> list[zipfile.ZipInfo]:
    """The file members of a safe zip; :class:`UploadRefused` for a damaged or unsafe one (among
    them a directory of more than ``MAX_ZIP_MEMBERS`` entries, refused before it is parsed)."""
    declared = zip_directory(path)
    if declared is not None and (declared[0] > MAX_ZIP_MEMBERS or declared[1] > MAX_ZIP_MEMBERS * ZIP_ENTRY_BYTES):
        raise UploadRefused(
            filename,
            f"the zip's directory declares {declared[0]:,} files in {declared[1]:,} bytes, more than the "
            f"{MAX_ZIP_MEMBERS:,} files of a series",
            "zip one DICOM series",
            status=413,
        )
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
                    f"zip member {shown_name(info.filename)!r} has {why}",
                    "zip the series folder with relative names (e.g. cd into it and run zip -r series.zip .)",
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UploadRefused(
                    filename,
                    f"zip member {shown_name(info.filename)!r} is a symbolic link",
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

    def __init__(self, root: Path, max_bytes: int, max_voxels: int = DEFAULT_MAX_VOXELS):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.max_voxels = int(max_voxels)

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
                check_dicom_members(raw, members, filename, self.max_voxels)
                target = self.root / stem
                try:
                    unpack_zip(raw, members, target, self.max_bytes * UNPACKED_LIMIT_FACTOR)
                except BaseException:
                    shutil.rmtree(target, ignore_errors=True)
                    raise
                raw.unlink()
                return target
            check_nifti(raw, kind, filename, self.max_voxels)
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
