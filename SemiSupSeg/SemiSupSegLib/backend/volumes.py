"""Reading and writing volumes through SimpleITK, keeping their geometry.

Every failure to read becomes a ``DataError`` that names the file and says in plain words what
is wrong, so users never see a raw ITK traceback. Writes are atomic: a crash leaves either the
old file or the new one, never half a file.
"""

from __future__ import annotations

import math
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from SemiSupSegLib.backend.atomic_files import TEMPORARY_MARK, temporary_name
from SemiSupSegLib.backend.errors import DataError

PathLike = Union[str, Path]

#: File endings ``write_image`` accepts, longest first so ".nii.gz" wins over ".gz".
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Endings written with compression (NIfTI only compresses as .nii.gz).
_COMPRESSED_SUFFIXES = (".nii.gz", ".nrrd", ".mha")
#: Header-only formats whose voxels live in a second file named inside the header.
_DETACHED_SUFFIXES = (".nhdr", ".mhd")

#: How far two geometries may differ and still be one voxel grid (``geometry_mismatch``): spacing
#: and origin by this share of the smaller spacing, direction cosines by this much. File formats
#: store geometry in single precision, so an image, its label map and a prediction written from
#: them can differ in the last digits.
GEOMETRY_TOLERANCE = 1e-3

_SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM folder"


# ---------------------------------------------------------------- reading


def read_image(path: PathLike) -> sitk.Image:
    """Read a volume file or a DICOM series folder; any failure is a ``DataError``."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file or folder does not exist")
    if path.is_dir():
        return _read_dicom_folder(path)
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        if path.name.lower().endswith(".gz") and _gzip_stream(path)[0] is False:
            raise DataError(path, "file is truncated: its compressed data ends early") from None
        reason = _short_reason(error, path)
        detail = f" ({reason})" if reason else ""
        raise DataError(path, f"not a readable image; expected {_SUPPORTED}{detail}") from None
    _check_nifti_length(path, reader)
    try:
        return reader.Execute()
    except RuntimeError as error:
        if _suffix(path) in _DETACHED_SUFFIXES:
            problem = "could not read the voxels: the data file named in this header is missing"
            raise DataError(path, f"{problem}, truncated or damaged") from None
        reason = _short_reason(error, path)
        detail = f" ({reason})" if reason else ""
        problem = "file is truncated or damaged; its voxels could not be read"
        raise DataError(path, problem + detail) from None


def _read_dicom_folder(path: Path) -> sitk.Image:
    """Read the one DICOM series in ``path``; several series or none is an error."""
    if not any(path.iterdir()):
        raise DataError(path, "folder is empty; expected the files of one DICOM series")
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM prints "No Series were found"
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)
    if not series_ids:
        raise DataError(path, "folder holds no DICOM series (no readable DICOM image files)")
    if len(series_ids) > 1:
        listed = ", ".join(
            f"{uid} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid))} files)"
            for uid in series_ids
        )
        raise DataError(
            path,
            f"folder holds {len(series_ids)} DICOM series: {listed}; "
            "put each series in its own folder",
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_ids[0]))
    try:
        return reader.Execute()
    except RuntimeError as error:
        reason = _short_reason(error, path) or "unknown reason"
        raise DataError(path, f"DICOM series could not be read ({reason})") from None


def _check_nifti_length(path: Path, reader: sitk.ImageFileReader) -> None:
    """Reject a NIfTI file shorter than its header promises.

    ITK's NIfTI reader silently fills missing voxels with zeros, so a file cut in half would
    otherwise load as a volume with a black lower part.
    """
    suffix = _suffix(path)
    if suffix not in (".nii", ".nii.gz"):
        return
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        voxels = math.prod(int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1))
        expected = (
            int(float(reader.GetMetaData("vox_offset")))
            + voxels * int(reader.GetMetaData("bitpix")) // 8
        )
    except (RuntimeError, ValueError):
        return  # header fields not exposed: leave the check to ITK
    if suffix == ".nii":
        actual = path.stat().st_size
        complete = actual >= expected
    else:
        complete, actual = _gzip_length_at_least(path, expected)
    if not complete:
        raise DataError(
            path,
            f"file is truncated: its header promises {expected} bytes (header and voxels), "
            f"only {actual} are there",
        )


def _gzip_length_at_least(path: Path, expected: int) -> Tuple[bool, int]:
    """Whether the gzip file decompresses completely to at least ``expected`` bytes.

    The gzip trailer stores the length modulo 2**32; when it matches, the file is whole (a cut
    file ends in arbitrary bytes). Otherwise decompress it to find out.
    """
    if path.stat().st_size >= 4:
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            (stored,) = struct.unpack("<I", handle.read(4))
        if stored == expected % 2**32:
            return True, expected
    complete, total = _gzip_stream(path)
    return complete is True and total >= expected, total


def _gzip_stream(path: Path) -> Tuple[Optional[bool], int]:
    """Decompress ``path`` and report (whether the gzip stream ends properly, bytes it holds).

    The flag is False for a stream that stops early and None for data that is not gzip at all;
    bytes after a complete stream that are not gzip are ignored, as zlib's readers do.
    """
    total, ended, members = 0, False, 0
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    try:
        for chunk in _chunks(path):
            while chunk:
                total += len(decompressor.decompress(chunk))
                ended = decompressor.eof
                chunk = decompressor.unused_data
                if ended:
                    members += 1
                    if chunk:  # another gzip member follows
                        decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    except zlib.error:
        return (True if members else None), total
    return ended, total


def _chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(size)
            if not chunk:
                return
            yield chunk


_ITK_PREFIX = re.compile(r"^(ITK ERROR: \w+\(0x[0-9a-fA-F]+\):|sitk::ERROR:)\s*")
# MetaImage reports every read failure as this, with a stale errno as the "reason".
_UNINFORMATIVE = re.compile(r"^(File cannot be read: .* for reading\.?|Reason: .*)$")


def _short_reason(error: Exception, path: Path) -> str:
    """The informative line of an ITK exception, without source locations or pointers."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    meaningful = [
        _ITK_PREFIX.sub("", line)
        for line in lines
        if not line.startswith("Exception thrown in SimpleITK") and not line.endswith(":")
    ]
    nrrd = [line for line in meaningful if line.startswith("[nrrd]")]
    if nrrd:
        meaningful = [nrrd[-1][len("[nrrd]") :].strip()]
    reason = " ".join(line for line in meaningful if not _UNINFORMATIVE.search(line))
    for name in (str(path), path.name):
        reason = reason.replace(f'"{name}"', "the file").replace(name, "the file")
    return reason[:200]


# ---------------------------------------------------------------- writing


def write_image(image: sitk.Image, path: PathLike) -> None:
    """Write ``image`` atomically, compressed where the format allows; creates parent folders.

    The temporary file has the same ending as ``path`` so that SimpleITK picks the same writer.
    Header + data formats (.mhd, .nhdr) are written under their final name inside a temporary
    folder next to ``path`` (the header names its data file), then moved data file first.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise DataError(path, f"cannot write this format; use one of {', '.join(WRITE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    compress = suffix in _COMPRESSED_SUFFIXES
    if suffix in _DETACHED_SUFFIXES:
        _write_detached(image, path, compress)
        return
    # Not mkstemp: its files are private (mode 0600); this one gets the umask's permissions.
    temporary = str(path.with_name(temporary_name(path.name[: -len(suffix)], suffix)))
    try:
        sitk.WriteImage(image, temporary, compress)
        os.replace(temporary, path)
    except RuntimeError as error:
        reason = _short_reason(error, path) or "unknown reason"
        raise DataError(path, f"could not write the image ({reason})") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _write_detached(image: sitk.Image, path: Path, compress: bool) -> None:
    with tempfile.TemporaryDirectory(
        prefix=f".{path.name}.", suffix=TEMPORARY_MARK, dir=path.parent
    ) as folder:
        staged = Path(folder) / path.name
        try:
            sitk.WriteImage(image, str(staged), compress)
        except RuntimeError as error:
            reason = _short_reason(error, staged) or "unknown reason"
            raise DataError(path, f"could not write the image ({reason})") from None
        for produced in sorted(Path(folder).iterdir(), key=lambda p: p.name == path.name):
            os.replace(produced, path.parent / produced.name)


def _suffix(path: Path) -> str:
    """The image ending of ``path`` in lower case (".nii.gz" counts as one), or ""."""
    lower = path.name.lower()
    for suffix in WRITE_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return path.suffix.lower()


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels sit in physical space (ITK/LPS conventions, x, y, z order)."""

    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]


def geometry_of(image: sitk.Image) -> Geometry:
    """The geometry of a SimpleITK image."""
    return Geometry(
        size=tuple(int(v) for v in image.GetSize()),
        spacing=tuple(float(v) for v in image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
    )


def geometry_mismatch(
    a: Union[sitk.Image, Geometry],
    b: Union[sitk.Image, Geometry],
    tolerance: float = GEOMETRY_TOLERANCE,
) -> Optional[str]:
    """Say what differs between two geometries ("size 3x4x5 vs 3x4x6; ..."), or None.

    The one comparison of voxel grids: training checks an image against its label map with it,
    evaluation a prediction against its truth. Spacing and origin may differ by ``tolerance``
    times the smaller spacing, direction cosines by ``tolerance`` absolutely.
    """
    first = a if isinstance(a, Geometry) else geometry_of(a)
    second = b if isinstance(b, Geometry) else geometry_of(b)
    if first.size != second.size:
        return f"size {_format_size(first.size)} vs {_format_size(second.size)}"
    scale = tolerance * min(first.spacing + second.spacing)
    problems = []
    for what, x, y, limit in (
        ("spacing", first.spacing, second.spacing, scale),
        ("origin", first.origin, second.origin, scale),
        ("direction", first.direction, second.direction, tolerance),
    ):
        if any(abs(p - q) > limit for p, q in zip(x, y)):
            problems.append(f"{what} {_format_values(x)} vs {_format_values(y)}")
    return "; ".join(problems) or None


def _format_size(size: Tuple[int, ...]) -> str:
    return "x".join(str(v) for v in size)


def _format_values(values: Tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


# ---------------------------------------------------------------- arrays


def array_from_image(image: sitk.Image) -> np.ndarray:
    """A copy of the voxels as a NumPy array in SimpleITK order (z, y, x[, component])."""
    return sitk.GetArrayFromImage(image)


def image_from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """An image of ``array`` (z, y, x order) with ``reference``'s spacing, origin, direction.

    Raises ValueError if the array's shape does not match the reference's size.
    """
    array = np.asarray(array)
    expected = tuple(reversed(reference.GetSize()))
    components = reference.GetNumberOfComponentsPerPixel()
    vector = components > 1
    if vector:
        expected = expected + (components,)
    if array.shape != expected:
        raise ValueError(
            f"array shape {array.shape} does not match the reference image "
            f"(size {_format_size(reference.GetSize())}, so shape {expected})"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.CopyInformation(reference)
    return image
