"""Medical inputs (DICOM series, NIfTI volumes) that are damaged: refused when the input is opened, in one line."""

from __future__ import annotations

import re

import pytest

from tests.test_dicom import run_refused, write_series
from tilemask.errors import InputError
from tilemask.sources.dicom import DicomSeriesSource


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage, what", [
    ("deleted", "no PixelData element: its image is missing"),
    ("empty", "an empty PixelData element: its image is missing"),
    ("cut", "cut short: its PixelData holds 380 of its 480 bytes"),  # pydicom: "(380 vs 480 bytes)"
    ("short", "its PixelData holds 240 bytes, where its 12 x 20 x 1 pixels of 16 bits need 480"),
    ("cut deflated", "cannot read DICOM: its deflated data do not inflate (cut short or damaged): Error -5 while "
                     "decompressing data: incomplete or truncated stream"),
])  # fmt: skip
@pytest.mark.slow  # 13 s in a loaded default run (2026-12-07)
def test_a_slice_without_its_pixels_is_refused_when_the_series_is_opened(damage, what, make_model, tmp_path):
    """A slice whose PixelData was deleted, left empty or cut short (a copy that stopped) was planned from its
    header, then failed on a worker, exit 1, with pydicom's "AttributeError: The dataset has no 'Pixel Data', ...
    element" or "ValueError: The number of bytes of pixel data is less than expected" (a PixelData element of half
    an image too). A deflated slice cut short
    does not inflate: zlib's error was a traceback."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    def damaged(ds, k):
        if k == 3 and damage == "deleted":
            del ds.PixelData
        elif k == 3 and damage == "empty":
            ds.PixelData = b""
        elif k == 3 and damage == "short":  # a whole file, its element as long as it says: half an image
            ds.PixelData = ds.PixelData[:240]
        elif damage == "cut deflated":
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    folder = write_series(tmp_path / "series", slices=8, mutate=damaged)  # 12 x 20 int16 pixels: 480 bytes
    if damage.startswith("cut"):
        cut = sorted(folder.iterdir())[0]
        cut.write_bytes(cut.read_bytes()[:-100])
    why = rf"^{re.escape(str(folder))}/slice\d+\.dcm: {re.escape(what)}$"
    with pytest.raises(InputError, match=why):
        DicomSeriesSource.open(str(folder))
    run_refused(folder, make_model, tmp_path, "tilemask: error: " + why[1:-1] + "\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("end", ["first", "last"])
def test_a_slice_cut_short_before_its_rows_is_refused_not_left_out(end, make_model, tmp_path):
    """A reviewer's: a slice whose file ends inside its header, before Rows, was taken for a file that holds no image
    (a DICOMDIR, a report) and left out; the first or last slice of a series leaves no gap, so the series ran a slice
    short, exit 0. An image's file (its SOP class an Image Storage) without Rows is refused."""
    import pydicom

    folder = write_series(tmp_path / "series", slices=8)
    files = sorted(folder.iterdir(), key=lambda f: pydicom.dcmread(f).InstanceNumber)
    cut = files[0 if end == "first" else -1]
    data = cut.read_bytes()
    cut.write_bytes(data[: data.index(b"\x28\x00\x10\x00")])  # up to (0028,0010) Rows
    assert "Rows" not in pydicom.dcmread(cut, force=True)
    why = rf"^{re.escape(str(cut))}: a CT Image Storage file without Rows or pixels \(cut short or damaged\?\): no " \
          r"PixelData element: its image is missing$"  # fmt: skip
    with pytest.raises(InputError, match=why):
        DicomSeriesSource.open(str(folder))
    run_refused(folder, make_model, tmp_path, "tilemask: error: " + why[1:-1] + "\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bits, what", [
    ((8, 16, 15), "its BitsStored 16 is not from 1 to its BitsAllocated 8: its pixels cannot be unpacked"),
    ((12, 12, 11), "its BitsAllocated 12 is not 1 or a multiple of 8 up to 64: its pixels cannot be unpacked"),
])  # fmt: skip
def test_a_slice_whose_bits_pydicom_cannot_unpack_is_refused_when_the_series_is_opened(bits, what, make_model,
                                                                                       tmp_path):  # fmt: skip
    """A slice of BitsAllocated 8 and BitsStored 16 was planned from its header, then failed on a worker, exit 1
    ("read failed: ValueError: A (0028,0101) 'Bits Stored' value of '16' is invalid"), as the other header problems
    are found when planning, exit 2."""
    import pydicom

    def bad_bits(ds, k):
        if k == 3:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits

    folder = write_series(tmp_path / "series", slices=8, mutate=bad_bits)
    bad = [f for f in folder.iterdir() if pydicom.dcmread(f).InstanceNumber == 4]
    with pytest.raises(ValueError, match="is invalid"):  # pydicom itself does not read its pixels
        pydicom.dcmread(bad[0]).pixel_array
    why = rf"^{re.escape(str(bad[0]))}: {re.escape(what)}$"
    with pytest.raises(InputError, match=why) as refused:
        DicomSeriesSource.open(str(folder))
    assert refused.value.exit_status == 2
    run_refused(folder, make_model, tmp_path, "tilemask: error: " + why[1:-1] + "\n")
