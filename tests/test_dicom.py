"""DICOM series in: geometry and values as SimpleITK (GDCM) reads them; pydicom's own real test series."""

from __future__ import annotations

import contextlib
import http.server
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

import tilemask
from tests.conftest import UNET_3D, _free_port, run_cli
from tilemask.errors import InputError, ReadError, WorkflowError
from tilemask.formats import for_path
from tilemask.sources.dicom import DicomSeriesSource
from tilemask.workflow import Workflow

SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
CT = SERIES / "98892001" / "CT5N"  # 5 axial slices, 0.49 x 0.49 x 2.5 mm, stored in descending position
RADIAL_MR = SERIES / "98892003" / "MR700"  # 7 slices, each in its own orientation: not a volume


def sitk_grid(path) -> tuple[np.ndarray, ...]:
    """Origin, direction and spacing as SimpleITK reads a file or a series."""
    if Path(path).is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    return np.array(image.GetOrigin()), np.array(image.GetDirection()), np.array(image.GetSpacing())


def sitk_ras(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's reading of a series: the voxel-to-RAS affine and the voxels as (i, j, k)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def write_series(
    folder: Path, rows=12, columns=20, slices=6, pixel_spacing=(0.7, 1.3), step=2.5, seed=0, mutate=None
) -> Path:
    """An oblique, non-square, anisotropic CT series written with pydicom, files in shuffled order;
    ``mutate(dataset, k)`` changes slice ``k`` before it is saved."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from scipy.spatial.transform import Rotation

    folder.mkdir(parents=True)
    rotation = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    row_cosines, column_cosines = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row_cosines, column_cosines)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in rng.permutation(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CTImageStorage, study, series
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "tilemask-test", int(k) + 1
        ds.FrameOfReferenceUID = frame
        ds.Rows, ds.Columns, ds.PixelSpacing = rows, columns, list(pixel_spacing)
        ds.ImageOrientationPatient = [float(v) for v in (*row_cosines, *column_cosines)]
        ds.ImagePositionPatient = [float(v) for v in np.array([-40.0, 25.0, 60.0]) + k * step * normal]
        ds.SliceThickness = step
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = rng.integers(0, 3000, (rows, columns)).astype(np.int16).tobytes()
        if mutate:
            mutate(ds, int(k))
        ds.save_as(folder / f"slice{rng.integers(1e9)}.dcm", enforce_file_format=True)
    return folder


def deflated(ds, k):
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian


def unsigned_32_bits(ds, k):
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.RescaleIntercept = 0
    ds.PixelData = (np.arange(ds.Rows * ds.Columns, dtype=np.uint32) * 40_000_003 + k).tobytes()  # to 4.3e9


@pytest.mark.parametrize("folder", [CT, "oblique", "deflated", "unsigned 32 bits"])
def test_a_series_folder_reads_as_simpleitk_reads_it(folder, tmp_path):
    """Deflated slices were refused as cut short: pydicom inflates the rest of the file to read the header.
    Unsigned 32-bit pixels of 2^31 or more were read as negative."""
    mutations = {"oblique": None, "deflated": deflated, "unsigned 32 bits": unsigned_32_bits}
    if folder in mutations:  # rows != columns, 0.7 x 1.3 mm pixels, 2.5 mm slices, tilted on three axes
        folder = write_series(tmp_path / folder.replace(" ", "-"), mutate=mutations[folder])
    source = for_path(str(folder)).open_source(str(folder), 3, None)
    assert isinstance(source, DicomSeriesSource)
    affine, voxels = sitk_ras(folder)
    np.testing.assert_allclose(np.asarray(source.geometry.affine), affine, atol=1e-4)
    assert source.spatial_shape == voxels.shape
    full = tuple((0, s) for s in source.spatial_shape)
    np.testing.assert_allclose(source.read(full)[0], voxels, atol=1e-3)
    part = ((3, 11), (5, 16), (1, 4))  # a region reads only its slices, and the same values
    np.testing.assert_array_equal(source.read(part)[0], source.read(full)[0][3:11, 5:16, 1:4])


def test_pydicoms_deflated_image_has_its_pixels():
    """pydicom's own deflated test file was said to hold 0 of its 262144 bytes of pixels."""
    from pydicom.data import get_testdata_file

    from tilemask.sources.dicom import read_header

    path = get_testdata_file("image_dfl.dcm")
    header, problem = read_header(path)
    assert problem is None and header == pydicom.dcmread(path, stop_before_pixels=True)
    assert pydicom.dcmread(path).pixel_array.shape == (header.Rows, header.Columns)


@pytest.mark.parametrize("room", ["unpacked", "no temporary file", "slices of two pixel types"])
def test_regions_of_a_series_are_simpleitks_voxels_however_it_is_read(tmp_path, monkeypatch, caplog, room):
    """Decoded once per process into a temporary file, or (no room for it, or a slice that would not fit it)
    slice by slice in place: the same voxels as SimpleITK's."""
    import tempfile

    from tilemask import sources

    folder = write_series(tmp_path / "series", rows=40, columns=30, slices=12)
    if room == "no temporary file":
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    if room == "slices of two pixel types":  # one slice stored unsigned: pydicom decodes it as uint16
        path = sorted(folder.iterdir())[0]
        ds = pydicom.dcmread(path)
        ds.PixelRepresentation = 0
        ds.PixelData = np.abs(ds.pixel_array).astype(np.uint16).tobytes()
        ds.save_as(path)
    _, voxels = sitk_ras(folder)
    source = DicomSeriesSource.open(str(folder))
    before = sources.unpacks
    for region in (((0, 30), (0, 40), (0, 12)), ((3, 11), (5, 16), (1, 4)), ((29, 30), (39, 40), (11, 12))):
        np.testing.assert_array_equal(source.read(region)[0], voxels[tuple(slice(a, b) for a, b in region)])
    assert sources.unpacks == before + (room == "unpacked")
    assert caplog.text.count("reading it in place") == (room != "unpacked")


@pytest.mark.slow  # 23 s in a loaded default run (2026-12-07, the 17th session)
def test_a_run_on_a_series_writes_labels_on_the_scan_grid(make_model, tmp_path, client):
    weights, _ = make_model(UNET_3D)
    wf = Workflow.from_dict(
        {
            "version": 1,
            "input": str(CT),
            "model": {"network": "UNet", "args": UNET_3D, "weights": str(weights)},
            "preprocess": {"normalize": {"mean": [100.0], "std": [100.0]}},
            "inference": {"roi_size": [16, 16, 16], "batch_size": 2, "device": "cpu"},
            "output": {"path": "out/{stem}_labels.nii.gz", "chunks": 16},
        },
        base_dir=tmp_path,
    )
    (result,) = tilemask.run(wf, client)
    labels = nib.load(tmp_path / "out" / "CT5N_labels.nii.gz")
    affine, voxels = sitk_ras(CT)
    np.testing.assert_allclose(labels.affine, affine, atol=1e-4)
    assert labels.shape == voxels.shape
    assert labels.header.get_xyzt_units()[0] == "mm"  # DICOM's unit, said (it was "unknown")
    for ours, theirs in zip(sitk_grid(labels.get_filename()), sitk_grid(CT)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)  # where SimpleITK puts the scan, it puts the labels


@pytest.mark.slow  # 13 s in a quiet default run (2026-12-08, the 18th session)
def test_labels_of_a_tilted_gantrys_series_are_where_simpleitk_puts_the_series_their_sform_tilted(
    make_model, tmp_path, client
):
    """Slices 2.5 mm apart along a direction 15 degrees off their normal: the sform keeps the tilt (each slice's
    position), the qform is SimpleITK's reading of the series (its labels read 4.3 mm off it at the last slice)."""
    tilt = np.array([0.0, np.sin(np.radians(15)), np.cos(np.radians(15))])

    def tilted(ds, k):
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [float(v) for v in np.array([-40.0, 25.0, 60.0]) + 2.5 * k * tilt]
        ds.GantryDetectorTilt = 15.0

    folder = write_series(tmp_path / "tilted", slices=14, mutate=tilted)
    weights, _ = make_model(UNET_3D)
    wf = Workflow.from_dict({
        "version": 1, "input": str(folder),
        "model": {"network": "UNet", "args": UNET_3D, "weights": str(weights)},
        "preprocess": {"normalize": {"mean": [100.0], "std": [100.0]}},
        "inference": {"roi_size": [16, 16, 16], "batch_size": 2, "device": "cpu"},
        "output": {"path": "out/labels.nii.gz", "chunks": 16},
    }, base_dir=tmp_path)  # fmt: skip
    tilemask.run(wf, client)
    labels = nib.load(tmp_path / "out" / "labels.nii.gz")
    sform, sform_code = labels.header.get_sform(coded=True)
    positions = [np.array([40.0, -25.0, 60.0]) + np.diag([-1, -1, 1]) @ (2.5 * k * tilt) for k in range(14)]
    assert sform_code == 1 and labels.header.get_qform(coded=True)[1] == 1
    np.testing.assert_allclose([(sform @ [0, 0, k, 1])[:3] for k in range(14)], positions, atol=1e-4)
    for ours, theirs in zip(sitk_grid(labels.get_filename()), sitk_grid(folder)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow  # 11 s in a loaded default run (2026-12-07, the 17th session)
def test_a_case_of_one_series_per_channel_gets_a_segmentation_of_the_first_series_slices(make_model, tmp_path, client):
    """nnU-Net's ``{case}_0000``, ``{case}_0001`` as DICOM series folders (a T2 and an ADC series of one study): the
    SEG refers to the first channel's slices, its frames the NIfTI run's labels. It was refused as "... /pat_0000 is
    not one" (a DICOM series), though the same channels ran to NIfTI."""
    import highdicom as hd

    for channel in (0, 1):
        write_series(tmp_path / "mr" / f"pat_{channel:04d}", rows=20, columns=24, slices=16, seed=channel)
    args = {**UNET_3D, "in_channels": 2}
    weights, _ = make_model(args)
    workflow = series_workflow(tmp_path / "mr", weights, ["background", "prostate"], 1500.0, 800.0)
    workflow["input"] = {"channels": [str(tmp_path / "mr" / "{case}_0000"), str(tmp_path / "mr" / "{case}_0001")]}
    workflow["model"]["args"] = args
    for suffix in (".nii.gz", ".dcm"):
        workflow["output"] = {"path": f"out/{{stem}}{suffix}", "chunks": 16}
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    labels = np.asarray(nib.load(tmp_path / "out" / "pat.nii.gz").dataobj)
    assert (labels == 1).any() and (labels == 0).any()
    seg = hd.seg.segread(tmp_path / "out" / "pat.dcm")
    first = [pydicom.dcmread(f) for f in DicomSeriesSource.open(str(tmp_path / "mr" / "pat_0000")).files]
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [first[0].SeriesInstanceUID]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in first],
                                               combine_segments=True)  # fmt: skip
    np.testing.assert_array_equal(frames, labels.transpose(2, 1, 0))


def test_a_folder_of_two_series_uneven_or_radial_slices_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"its orientation \[.*\] differs from \[.*\] of .*; tilemask reads one grid"):
        DicomSeriesSource.open(str(RADIAL_MR))
    mixed = tmp_path / "mixed"
    shutil.copytree(RADIAL_MR, mixed / "a")
    shutil.copytree(CT, mixed / "b")
    listed = []  # each series named, with what it is and how many files: the folder holds 14 + 5 slices
    for folder in (mixed / "a", mixed / "b"):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        what = first.get("SeriesDescription") or first.Modality
        example = f"{folder.name}/{files[0].name}"  # its path in the folder given
        listed.append(f"{first.SeriesInstanceUID} ({what}, {len(files)} file(s), such as {example})")
    assert len(files) < len(list((mixed / "a").iterdir()))  # the larger series first
    with pytest.raises(InputError, match=re.escape(f"holds 2 DICOM series; give the folder of one series: "
                                                   f"{listed[0]}; {listed[1]}")):  # fmt: skip
        DicomSeriesSource.open(str(mixed))
    uneven = tmp_path / "uneven"
    shutil.copytree(CT, uneven)
    by_position = sorted(uneven.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    by_position[2].unlink()  # the middle slice of five: a gap
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in (by_position[1], by_position[3])]
    why = (rf"not evenly spaced: the series steps 2.5 mm, but {by_position[1].name} and {by_position[3].name}, at "
           rf"{z[0]:g} and {z[1]:g} mm along the slice normal, are 5 mm apart \(a missing slice\?\)")  # fmt: skip
    with pytest.raises(InputError, match=why):  # it said "5 mm apart where the series steps 3.333 mm": the average
        DicomSeriesSource.open(str(uneven))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gap", ["two missing", "wider"])
def test_a_gap_in_a_series_is_named_with_the_series_own_spacing_and_where_it_lies(gap, make_model, tmp_path):
    """Two slices missing from ten 2.5 mm slices were "7.5 mm apart where the series steps 3.214 mm" (the average
    from the first slice to the last), naming neither the spacing nor where along the scan the gap is."""
    def wider(ds, k):
        if k >= 6:  # slices 6 to 9 one more mm on: the gap between slices 5 and 6 is 3.5 mm
            normal = np.cross(*np.reshape(np.array(ds.ImageOrientationPatient, float), (2, 3)))
            ds.ImagePositionPatient = [float(v) for v in np.array(ds.ImagePositionPatient, float) + normal]

    folder = write_series(tmp_path / "series", slices=10, mutate=wider if gap == "wider" else None)
    by_number = {int(pydicom.dcmread(f).InstanceNumber) - 1: f for f in folder.iterdir()}
    if gap == "two missing":
        by_number.pop(4).unlink()
        by_number.pop(5).unlink()
    a, b = (by_number[3], by_number[6]) if gap == "two missing" else (by_number[5], by_number[6])
    along = []
    for f in (a, b):
        ds = pydicom.dcmread(f)
        normal = np.cross(*np.reshape(np.array(ds.ImageOrientationPatient, float), (2, 3)))
        along.append(float(np.array(ds.ImagePositionPatient, float) @ normal))
    apart, why = ("7.5", "2 missing slices") if gap == "two missing" else ("3.5", "a change of spacing")
    line = (rf"tilemask: error: {re.escape(str(folder))}: slices are not evenly spaced: the series steps 2.5 mm, "
            rf"but {a.name} and {b.name}, at {along[0]:g} and {along[1]:g} mm along the slice normal, are {apart} mm "
            rf"apart \({why}\?\); tilemask reads a regular grid\n")  # fmt: skip
    run_refused(folder, make_model, tmp_path, line)


def test_slices_at_positions_rounded_to_a_hundredth_of_a_mm_read_as_simpleitk_reads_them(tmp_path, caplog):
    """0.625 mm slices at positions written to 2 decimals were "not evenly spaced"; GDCM warns and reads them."""

    def rounded(ds, k):
        ds.ImagePositionPatient = [round(float(v), 2) for v in ds.ImagePositionPatient]

    folder = write_series(tmp_path / "rounded", slices=9, step=0.625, mutate=rounded)
    source = DicomSeriesSource.open(str(folder))
    assert "slices depart from a regular grid by up to" in caplog.text
    affine, voxels = sitk_ras(folder)
    np.testing.assert_allclose(np.asarray(source.geometry.affine), affine, atol=2e-3)
    np.testing.assert_array_equal(source.read(((0, 20), (0, 12), (0, 9)))[0], voxels)


@pytest.mark.parametrize("fault", ["colour", "pixel spacing"])
def test_a_colour_series_or_one_of_two_pixel_spacings_is_refused_by_name(fault, tmp_path):
    """A colour series failed deep in a worker ("operands could not be broadcast"); a slice of another pixel
    spacing was read on the first slice's, silently."""

    def colour(ds, k):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.zeros((12, 20, 3), np.uint8).tobytes()

    def spacing(ds, k):
        if k == 3:
            ds.PixelSpacing = [0.9, 1.3]

    folder = write_series(tmp_path / "series", mutate=colour if fault == "colour" else spacing)
    why = (r"RGB pixels \(SamplesPerPixel 3\); tilemask reads greyscale series$" if fault == "colour" else
           r"its pixel spacing \[0.[79], 1.3\] differs from \[0.[79], 1.3\] of slice\d+.dcm; tilemask reads one grid$")
    with pytest.raises(InputError, match=why):
        DicomSeriesSource.open(str(folder))


def test_a_repeated_slice_an_empty_folder_headerless_files_and_a_nifti_pair_are_named(tmp_path):
    """Each was "not evenly spaced" or GDAL's "not recognized as being in a supported file format"."""
    from tilemask.sources import open_source

    repeated = tmp_path / "repeated"
    shutil.copytree(CT, repeated)
    first = sorted(repeated.iterdir())[0]
    copy = pydicom.dcmread(first)
    copy.SOPInstanceUID = pydicom.uid.generate_uid()  # a PACS export that gave one slice twice
    copy.save_as(repeated / "copy.dcm")
    with pytest.raises(InputError, match=rf"{repeated}: (copy.dcm and {first.name}|{first.name} and copy.dcm) are "
                                         r"slices at one position \(1 such pair"):  # fmt: skip
        DicomSeriesSource.open(str(repeated))

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=rf"^{tmp_path / 'empty'}: an empty folder$"):
        open_source(str(tmp_path / "empty"), 3)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in sorted(CT.iterdir()):
        (bare / f.name).write_bytes(f.read_bytes()[132:])  # no preamble, no "DICM": what old archives hold
    with pytest.raises(InputError, match=rf"^{bare}: DICOM files without the Part 10 header \('DICM' at byte 128\)"):
        open_source(str(bare), 3)

    pair = tmp_path / "pair.hdr"
    nib.save(nib.Nifti1Pair(np.zeros((4, 4, 4), np.int16), np.eye(4)), pair)
    for given in (pair, pair.with_suffix(".img")):
        with pytest.raises(InputError, match=rf"^{given}: a NIfTI pair \(.hdr and .img\); tilemask reads one-file NIfTI"):
            open_source(str(given), 3)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["header zeroed", "cut short", "named .dcm"])
def test_a_damaged_slice_among_a_series_is_named_not_left_out(damage, make_model, tmp_path):
    """A slice with no 'DICM' at byte 128 was dropped from its series: the last one gone, the run exited 0."""
    folder = tmp_path / "series"
    if damage == "named .dcm":
        write_series(folder)
    else:
        shutil.copytree(CT, folder)
    last = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))[-1]
    data = last.read_bytes()
    last.write_bytes(bytes(200) + data[200:] if damage == "header zeroed" else data[:100])
    (folder / "notes.txt").write_text("acquired on the old scanner")  # files not named as slices are no slices
    (folder / ".DS_Store").write_bytes(bytes(64))
    size = last.stat().st_size
    run_refused(folder, make_model, tmp_path, rf"tilemask: error: {re.escape(str(last))}: not a DICOM Part 10 file "
                rf"\({size} bytes, no 'DICM' at byte 128\), named as the series' slices beside it: a slice damaged or "
                r"cut short\? Repair or remove it\n")  # fmt: skip
    last.unlink()
    slices = DicomSeriesSource.open(str(folder)).volume_shape[2]
    assert slices == (5 if damage == "named .dcm" else 4)  # write_series wrote 6, CT5N has 5


@pytest.mark.timeout(60)
def test_a_slice_whose_pixels_do_not_decode_says_why_in_its_one_line(tmp_path):
    """pydicom gives each decoder's reason on a line of its own: the line of the error ended at "plugins:"."""

    def damaged_rle(ds, k):
        ds.compress(pydicom.uid.RLELossless, np.frombuffer(ds.PixelData, np.int16).reshape(ds.Rows, ds.Columns))
        if k == 2:  # the RLE header of its one fragment says 7 segments, where 16-bit greyscale has 2
            data = bytearray(ds.PixelData)
            start = data.find(b"\xfe\xff\x00\xe0", 8) + 8
            data[start:start + 4] = (7).to_bytes(4, "little")
            ds.PixelData = bytes(data)

    source = DicomSeriesSource.open(str(write_series(tmp_path / "series", mutate=damaged_rle)))
    with pytest.raises(ReadError) as caught:
        source.read(((0, 20), (0, 12), (0, 6)))
    assert re.fullmatch(r".*/slice\d+\.dcm: read failed: RuntimeError: Unable to decode as exceptions were raised "
                        r"by all available plugins: pydicom: The number of RLE segments in the pixel data doesn't "
                        r"match the expected amount \(7 vs. 2 segments\)", str(caught.value)), \
        str(caught.value)  # fmt: skip


@pytest.mark.timeout(60)
def test_a_slice_without_a_series_uid_among_slices_with_one_is_named(tmp_path):
    def unnamed(ds, k):
        if k == 3:
            del ds.SeriesInstanceUID

    folder = write_series(tmp_path / "series", mutate=unnamed)
    with pytest.raises(InputError, match=r"/slice\d+\.dcm: no SeriesInstanceUID, where 5 other slice\(s\) have one"):
        DicomSeriesSource.open(str(folder))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) on free loopback ports; yields its DICOMweb root."""
    yield from _orthanc(tmp_path_factory)


@pytest.fixture(scope="module")
def orthanc_with_users(tmp_path_factory):
    """The same Orthanc with HTTP Basic authentication (user ``alice``, password ``secret``); yields its DICOMweb
    root, without them."""
    yield from _orthanc(tmp_path_factory, AuthenticationEnabled=True, RegisteredUsers={"alice": "secret"})


def _orthanc(tmp_path_factory, **settings):
    import json
    import subprocess
    import time

    import httpx

    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not Path(exe).exists() or not plugin.exists():
        pytest.fail(
            "Debian's orthanc and orthanc-dicomweb are not installed (apt-get install orthanc orthanc-dicomweb)"
        )
    folder = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "tilemask-test", "HttpPort": port, "DicomServerEnabled": False, "DicomPort": _free_port(),
        "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{port}"}, **settings,
    }  # fmt: skip
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")
    proc = subprocess.Popen([exe, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/system", timeout=2).status_code in (200, 401):
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}/dicom-web"
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def run_refused(folder, make_model, tmp_path, line: str) -> None:
    """``tilemask run`` of the series in ``folder`` (a 3D UNet writing ``out/{stem}_labels.nii.gz``): refused in the
    one line the regular expression ``line`` matches, exit 2, no output folder."""
    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    workflow["output"] = {"path": "out/{stem}_labels.nii.gz"}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(workflow))
    result = run_cli("run", tmp_path / "w.yaml", cwd=tmp_path)
    assert result.returncode == 2 and re.fullmatch(line, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()


def series_workflow(folder, weights, classes: list[str], mean: float, std: float) -> dict:
    """A 3D UNet (``UNET_3D``) over a series folder, roi 16^3, batches of 2, on the CPU; no output yet."""
    return {
        "version": 1,
        "input": str(folder),
        "classes": classes,
        "model": {"network": "UNet", "args": UNET_3D, "weights": str(weights)},
        "preprocess": {"normalize": {"mean": [mean], "std": [std]}},
        "inference": {"roi_size": [16, 16, 16], "batch_size": 2, "device": "cpu"},
    }


@pytest.mark.slow
@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
def test_a_dicom_segmentation_is_stored_on_orthanc_and_equals_the_nifti_labels(make_model, tmp_path, client, orthanc,
                                                                               seg_type):  # fmt: skip
    """``output.seg_type: binary``: a frame per slice and segment in it, the Segmentation Storage that older viewers
    and PACS read (a LABELMAP is the newer Label Map Segmentation Storage)."""
    import highdicom as hd
    from dicomweb_client.api import DICOMwebClient

    weights, _ = make_model(UNET_3D)
    base = series_workflow(CT, weights, ["background", "brain"], 100.0, 100.0)
    outputs = {
        "nifti": {"path": "out/{stem}_labels.nii.gz", "chunks": 16},
        "seg": {"path": "out/{stem}_seg.dcm", "chunks": 16, "dicomweb": orthanc, "seg_type": seg_type},
    }
    source = DicomSeriesSource.open(str(CT))
    study = pydicom.dcmread(source.files[0]).StudyInstanceUID
    web = DICOMwebClient(url=orthanc)

    def segs() -> set[str]:  # QIDO-RS: the server is the session's, other tests' SEGs of the series on it
        found = web.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"})
        return {series["0020000E"]["Value"][0] for series in found}

    before = segs()
    for output in outputs.values():
        tilemask.run(Workflow.from_dict({**base, "output": output}, base_dir=tmp_path), client)
    labels = np.asarray(nib.load(tmp_path / "out" / "CT5N_labels.nii.gz").dataobj)
    assert (labels == 1).any() and (labels == 0).any()

    local = pydicom.dcmread(tmp_path / "out" / "CT5N_seg.dcm")
    assert segs() - before == {local.SeriesInstanceUID}
    stored = web.retrieve_instance(study, local.SeriesInstanceUID, local.SOPInstanceUID)  # WADO-RS
    seg = hd.seg.Segmentation.from_dataset(stored)
    # LABELMAP segmentations carry the background as a segment of their own (highdicom adds it)
    assert [d.segment_label for d in seg.SegmentSequence if d.segment_label != "Background"] == ["brain"]
    assert seg.SegmentationType == seg_type.upper() and seg.SOPClassUID == local.SOPClassUID
    # the Label Map Segmentation Storage, the Segmentation Storage (PS3.4)
    assert seg.SOPClassUID == {"labelmap": "1.2.840.10008.5.1.4.1.1.66.7", "binary": pydicom.uid.SegmentationStorage}[
        seg_type]  # fmt: skip
    sources = [pydicom.dcmread(f).SOPInstanceUID for f in source.files]  # the k axis, in order
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, combine_segments=True)
    for k in range(labels.shape[2]):  # per slice, the segments are the labels of the NIfTI path
        np.testing.assert_array_equal(frames[k], labels[:, :, k].T)


@pytest.mark.slow  # two runs over a 5-slice series
def test_a_binary_segmentation_holds_no_frame_of_a_segment_absent_from_its_slice(make_model, tmp_path, client):
    """``output.seg_type: binary`` wrote a frame for each slice and each class, empty or not: 10 classes on this
    5-slice series, 45 frames, 9 of them empty here (a TotalSegmentator's 117 classes on 300 slices of 512 x 512:
    35,100 frames of 32 kB, 1.1 GB, where its label map is 79 MB). Frames of a segment absent from a slice are left
    out, as DICOM allows (highdicom's default); the frames read back as the NIfTI run's labels."""
    import highdicom as hd

    classes = ["background", *(f"organ{n}" for n in range(1, 10))]
    args = {**UNET_3D, "out_channels": len(classes)}
    weights, _ = make_model(args)
    base = series_workflow(CT, weights, classes, 100.0, 100.0)
    base["model"]["args"] = args
    base["postprocess"] = {"keep_largest": True}  # each class in a few slices, not in all (a random network's)
    for output in ({"path": "out/{stem}_labels.nii.gz", "chunks": 16},
                   {"path": "out/{stem}_seg.dcm", "chunks": 16, "seg_type": "binary"}):  # fmt: skip
        tilemask.run(Workflow.from_dict({**base, "output": output}, base_dir=tmp_path), client)
    labels = np.asarray(nib.load(tmp_path / "out" / "CT5N_labels.nii.gz").dataobj).transpose(2, 1, 0)  # k, rows
    present = sum(len(set(np.unique(one)) - {0}) for one in labels)  # the (slice, segment) pairs with a voxel
    assert 0 < present < 9 * len(labels)
    seg = hd.seg.segread(tmp_path / "out" / "CT5N_seg.dcm")
    assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == present
    sources = [pydicom.dcmread(f).SOPInstanceUID for f in DicomSeriesSource.open(str(CT)).files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, combine_segments=True)
    np.testing.assert_array_equal(frames, labels)


def test_seg_type_is_refused_for_an_output_that_is_no_dicom_segmentation(tmp_path):
    with pytest.raises(WorkflowError, match=r"seg_type is a DICOM Segmentation's: output.path must end with .dcm"):
        Workflow.from_dict({"version": 1, "input": "a.nii.gz",
                            "model": {"network": "UNet", "args": UNET_3D, "weights": "w.pt"},
                            "inference": {"roi_size": [16, 16, 16]},
                            "output": {"path": "out/labels.nii.gz", "seg_type": "binary"}},
                           base_dir=tmp_path)  # fmt: skip


def test_a_store_that_fails_keeps_the_segmentation_and_a_server_that_does_not_answer_is_refused_first(
    make_model, tmp_path, client, orthanc_dropping
):
    """A failed store removed the SEG (every window run again to get it back); a server that did not answer was
    found only once every window had run."""
    import json

    from tilemask.errors import OutputError

    weights, _ = make_model(UNET_3D)
    base = series_workflow(CT, weights, ["background", "brain"], 100.0, 100.0)
    output = {"path": "out/{stem}_seg.dcm", "chunks": 16, "dicomweb": orthanc_dropping}  # it answers, and drops it
    with pytest.raises(OutputError, match=rf"^output.dicomweb: storing {tmp_path}/out/CT5N_seg.dcm on "
                                          rf"{orthanc_dropping} failed: .*\(the file is whole and kept\)$"):  # fmt: skip
        tilemask.run(Workflow.from_dict({**base, "output": output}, base_dir=tmp_path), client)
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(tmp_path / "out" / "CT5N_seg.dcm"))
    assert seg.SegmentationType == "LABELMAP" and len(seg.PerFrameFunctionalGroupsSequence) == 5
    beside = tmp_path / "CT5N"  # the SEG kept beside its slices is not one of them: it was "holds 2 DICOM series"
    shutil.copytree(CT, beside)
    shutil.copy(tmp_path / "out" / "CT5N_seg.dcm", beside)
    read = DicomSeriesSource.open(str(beside))
    assert [Path(f).name for f in read.files] == [Path(f).name for f in DicomSeriesSource.open(str(CT)).files]

    silent = f"http://127.0.0.1:{_free_port()}/dicom-web"  # nothing listens there
    output = {"path": "silent/{stem}_seg.dcm", "chunks": 16, "dicomweb": silent}
    with pytest.raises(OutputError, match=rf"^output.dicomweb: {silent} does not answer: .*Connection refused"):
        tilemask.run(Workflow.from_dict({**base, "output": output}, base_dir=tmp_path), client)
    (job,) = (tmp_path / "silent" / ".tilemask" / "jobs").iterdir()
    assert not (job / "manifest.jsonl").exists() or "started" not in (job / "manifest.jsonl").read_text()
    assert json.loads((job / "status.json").read_text())["state"] == "failed"
    assert sorted(p.name for p in (tmp_path / "silent").iterdir()) == [".tilemask"]


@contextlib.contextmanager
def _failing_then_forwarding(root: str):
    """A DICOMweb proxy in front of ``root`` whose STOW-RS answers 500 while its ``failing`` event is set, and is
    passed on to ``root`` after; QIDO-RS is always passed on.  Yields its root and the event (set)."""
    import threading

    import httpx

    failing = threading.Event()
    failing.set()

    def answer(handler):
        if handler.command == "POST" and failing.is_set():
            return 500, {}, b""
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("accept", "content-type")}
        got = httpx.request(handler.command, root + handler.path.removeprefix("/dicom-web"), headers=headers,
                            content=handler.body, timeout=60)  # fmt: skip
        return got.status_code, {"Content-Type": got.headers.get("Content-Type", "application/dicom+json")}, got.content

    with _Answering(answer) as server:
        yield f"{server}/dicom-web", failing


@pytest.mark.timeout(240)
def test_a_segmentation_whose_store_failed_is_stored_alone_by_a_retry(make_model, tmp_path, client, orthanc):
    """A store that failed (the server down) could not be sent again: ``--retry-failed`` predicted every window
    again, and a workflow given the server's new URL met "exists; pass --overwrite". The retry of the same job now
    stores the SEG in place, predicting nothing."""
    import json

    from dicomweb_client.api import DICOMwebClient

    from tilemask.errors import OutputError

    weights, _ = make_model(UNET_3D)
    with _failing_then_forwarding(orthanc) as (root, failing):
        workflow = {**series_workflow(CT, weights, ["background", "brain"], 100.0, 100.0),
                    "output": {"path": "out/{stem}_seg.dcm", "chunks": 16, "dicomweb": root}}  # fmt: skip
        with pytest.raises(OutputError, match="^output.dicomweb: storing .*CT5N_seg.dcm on .* failed: .*500") as info:
            tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        assert info.value.exit_status == 1
        seg = tmp_path / "out" / "CT5N_seg.dcm"
        written = seg.stat().st_mtime_ns
        (job,) = (tmp_path / "out" / ".tilemask" / "jobs").iterdir()
        lines = [json.loads(line) for line in (job / "manifest.jsonl").read_text().splitlines()]
        assert lines[-1]["status"] == "failed" and lines[-1]["undelivered"] and lines[-1]["outputs"][0] == str(seg)

        kept = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)  # failed stays failed
        assert [r.status for r in kept] == ["failed"]
        failing.clear()  # the server is back
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, retry_failed=True)
    assert (result.status, result.windows, result.error) == ("ok", 0, None), result  # not the store's old error
    assert seg.stat().st_mtime_ns == written  # not predicted again
    local = pydicom.dcmread(seg)
    found = DICOMwebClient(url=orthanc).search_for_instances(  # the module's Orthanc may hold other SEGs of CT5N
        study_instance_uid=local.StudyInstanceUID, search_filters={"SeriesInstanceUID": local.SeriesInstanceUID}
    )  # (the slow test's, run in one session with this one: "Left contains one more item")
    assert [s["00080018"]["Value"][0] for s in found] == [local.SOPInstanceUID]
    (done,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, retry_failed=True)
    assert (done.status, done.error) == ("skipped", None)  # ok now: resumed as any finished item


class _EmptyQido(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server whose QIDO-RS answers an empty list, quietly."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _dicomweb_server(handler=_EmptyQido, certificate=None):
    """``handler`` served on a free loopback port, over TLS with ``certificate`` (its certificate and key files);
    yields its DICOMweb root."""
    import ssl
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if certificate is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certificate)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http{'s' if certificate else ''}://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _stalled_dicomweb():
    """A DICOMweb server whose QIDO-RS answers an empty list and whose STOW-RS takes the store and never answers;
    yields its root and an event set once a store has come."""
    import threading

    posted, release = threading.Event(), threading.Event()

    class Stalled(_EmptyQido):
        def do_POST(self):  # noqa: N802 - STOW-RS: taken, never answered
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            posted.set()
            release.wait(300)

    with _dicomweb_server(Stalled) as root:
        try:
            yield root, posted
        finally:
            release.set()


def _stored_and_recorded_failed(folder: Path, root: str) -> dict:
    """The SEG in ``folder`` is whole, and its item is recorded failed naming the store cut short; the job."""
    import json

    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(folder / "CT5N_seg.dcm"))
    assert len(seg.PerFrameFunctionalGroupsSequence) == 5  # whole, in place
    (job,) = (folder / ".tilemask" / "jobs").iterdir()
    lines = [json.loads(line) for line in (job / "manifest.jsonl").read_text().splitlines()]
    last = [line for line in lines if line.get("status") in ("ok", "failed")][-1]
    assert last["status"] == "failed" and f"the run stopped while storing {folder}/CT5N_seg.dcm on {root}" \
        in last["error"], last  # fmt: skip
    return json.loads((job / "status.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_while_the_segmentation_is_stored_on_a_stalled_server_stops_at_once(make_model, tmp_path):
    """A server that takes the store and never answers held a Ctrl-C (two, even) for 122 s: the store ran inside
    the publishing a stop waits for. Now the run stops within seconds, exit 130, and so does ``tilemask cancel``
    (the job cancelled, not failed: a review); the SEG is whole and in place, and the item is recorded failed,
    naming the store it did not see end (a rerun with --retry-failed asks again)."""
    import signal
    import time

    weights, _ = make_model(UNET_3D)
    exe = Path(sys.executable).parent / "tilemask"
    with _stalled_dicomweb() as (root, posted):
        for folder, stop in (("out", "Ctrl-C"), ("cancelled", "tilemask cancel")):
            workflow = {**series_workflow(CT, weights, ["background", "brain"], 100.0, 100.0),
                        "output": {"path": f"{folder}/{{stem}}_seg.dcm", "chunks": 16, "dicomweb": root}}  # fmt: skip
            (tmp_path / "w.yaml").write_text(yaml.safe_dump(workflow))
            posted.clear()
            proc = subprocess.Popen([str(exe), "run", str(tmp_path / "w.yaml")], cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)  # fmt: skip
            try:
                assert posted.wait(150), "the store never came"
                stopped = time.monotonic()
                if stop == "Ctrl-C":
                    proc.send_signal(signal.SIGINT)
                else:
                    (job,) = (tmp_path / folder / ".tilemask" / "jobs").iterdir()
                    assert run_cli("cancel", job.name, cwd=tmp_path).returncode == 0
                _, stderr = proc.communicate(timeout=60)
                waited = time.monotonic() - stopped
            finally:
                proc.kill()
            state = _stored_and_recorded_failed(tmp_path / folder, root)["state"]
            expected = {"Ctrl-C": 130, "tilemask cancel": 1}[stop]
            assert (proc.returncode, state) == (expected, "cancelled") and waited < 30, (stop, state, waited, stderr)


@pytest.mark.timeout(240)
def test_a_stop_python_swallowed_while_the_segmentation_is_stored_stops_at_once(make_model, tmp_path, client):
    """A stop raised in an item's thread (one Python swallowed in the main thread, :mod:`tilemask.interrupts`)
    was not the abandon the store's step let go of: the stop waited 70 s for the store, and the item stayed
    "started" (a review)."""
    import threading
    import time

    from tilemask import interrupts

    weights, _ = make_model(UNET_3D)
    with _stalled_dicomweb() as (root, posted):
        workflow = {**series_workflow(CT, weights, ["background", "brain"], 100.0, 100.0),
                    "output": {"path": "out/{stem}_seg.dcm", "chunks": 16, "dicomweb": root}}  # fmt: skip

        asked: list[float] = []

        def swallowed() -> None:
            if posted.wait(150):
                asked.append(time.monotonic())
                interrupts._asked = True  # as the unraisable hook notes a KeyboardInterrupt Python did not raise

        threading.Thread(target=swallowed, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        stopped = time.monotonic() - asked[0]
    interrupts._asked = False
    assert stopped < 20, stopped  # it waited for the store: 60 s, the drain's limit
    _stored_and_recorded_failed(tmp_path / "out", root)


def test_a_dicomweb_series_given_as_the_input_is_refused_naming_what_it_is(make_model, tmp_path, client, orthanc):
    """A WADO-RS URL of a series Orthanc holds, as the input, fell through to GDAL: "cannot open raster: HTTP
    response code: 404" (Orthanc answers HEAD 404, GET 200). One line, exit 2, saying how to get a folder."""
    import httpx

    from tilemask.errors import InputError

    for path in sorted(p for p in CT.iterdir() if p.is_file()):
        assert httpx.post(f"{orthanc.removesuffix('/dicom-web')}/instances", content=path.read_bytes()).is_success
    first = pydicom.dcmread(next(p for p in sorted(CT.iterdir()) if p.is_file()), stop_before_pixels=True)
    url = f"{orthanc}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    assert httpx.get(f"{url}/metadata").status_code == 200  # Orthanc holds it
    weights, _ = make_model(UNET_3D)
    workflow = {**series_workflow(url, weights, ["background", "brain"], 100.0, 100.0),
                "output": {"path": "out/{stem}_labels.nii.gz"}}  # fmt: skip
    with pytest.raises(InputError, match=rf"^{re.escape(url)}: a DICOMweb \(WADO-RS\) study or series, which tilemask "
                                         r"does not read; retrieve the series into a folder") as caught:  # fmt: skip
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert caught.value.exit_status == 2 and not (tmp_path / "out").exists()
    from tilemask.formats import for_path

    sop = first.SOPInstanceUID
    for given, dicomweb in ((f"{url}/instances/{sop}", True), (f"/vsicurl/{url}#x", True), (f"{url}/metadata", True),
                            ("https://host/api/v1/studies/42?format=tif", False),  # no UID: a diff review's
                            ("https://host/studies/2024/x.tif", False)):  # fmt: skip
        assert (for_path(given).name == "dicom") == dicomweb, given
    for given, name in (("https://host/x.tif?name=a.mha", "cog"), ("https://host/x.tif?out=a.zarr", "cog"),
                        ("https://host/x.tif?f=a.dcm", "cog"), ("https://host/x.nii.gz?sig=abc", "nifti")):
        assert for_path(given).name == name, given  # a URL's name ends before its query (a diff review's)


def test_a_mistyped_dicomweb_root_is_refused_before_any_window_and_orthancs_own_root_is_warned_of(
    make_model, tmp_path, client, orthanc, caplog
):
    """A reviewer's typo (``/dicomweb``) and Orthanc's own root passed the check: every window ran, then the store
    failed (404, 405), and a rerun with the URL mended found the SEG in place (pass --overwrite: every window
    again). A root whose /studies is not there (404) is now refused first, exit 2; a 400 or 405 is a warning."""
    from tilemask.errors import WorkflowError
    from tilemask.sinks.dicomseg import check_answers

    weights, _ = make_model(UNET_3D)
    base = series_workflow(CT, weights, ["background", "brain"], 100.0, 100.0)
    typo = orthanc.replace("/dicom-web", "/dicomweb")
    output = {"path": "out/{stem}_seg.dcm", "chunks": 16, "dicomweb": typo}
    with pytest.raises(WorkflowError, match=rf"^output.dicomweb: {typo} is no DICOMweb root: GET {typo}/studies "
                                            r"answered 404 Not Found; give the DICOMweb root, ") as caught:  # fmt: skip
        tilemask.run(Workflow.from_dict({**base, "output": output}, base_dir=tmp_path), client)
    assert caught.value.exit_status == 2
    assert not (tmp_path / "out").exists()  # refused before the job was made: no window ran, no SEG
    orthancs_root = orthanc.removesuffix("/dicom-web")
    with caplog.at_level(logging.WARNING, logger="tilemask.sinks.dicomseg"):
        check_answers(orthancs_root)
    assert f"{orthancs_root} may be no DICOMweb root (GET {orthancs_root}/studies answered 4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tilemask.sinks.dicomseg"):
        check_answers(orthanc)  # the real root: nothing to say
    assert caplog.text == ""


@pytest.mark.slow
def test_credentials_the_server_refuses_are_refused_before_any_window_and_those_it_takes_store(
    make_model, tmp_path, client, orthanc_with_users
):
    """A DICOMweb server that refuses the URL's user and password (401) passed the check before the windows (any
    answer did): every window ran, then the store failed (exit 1). The credentials go in the URL."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    from tilemask.errors import WorkflowError

    weights, _ = make_model(UNET_3D)
    base = series_workflow(CT, weights, ["background", "brain"], 100.0, 100.0)
    root = orthanc_with_users
    for given, why in [(root.replace("http://", "http://alice:wrong@"), "refuses the user and password in the URL"),
                       (root, "wants a user and password")]:  # fmt: skip
        output = {"path": "refused/{stem}_seg.dcm", "chunks": 16, "dicomweb": given}
        with pytest.raises(WorkflowError, match=rf"^output.dicomweb: {root} {why} \(401 Unauthorized\)"):
            tilemask.run(Workflow.from_dict({**base, "output": output}, base_dir=tmp_path), client)
    assert not (tmp_path / "refused").exists()  # refused before any work: not even the job's folder

    output = {"path": "out/{stem}_seg.dcm", "chunks": 16, "dicomweb": root.replace("http://", "http://alice:secret@")}
    tilemask.run(Workflow.from_dict({**base, "output": output}, base_dir=tmp_path), client)
    local = pydicom.dcmread(tmp_path / "out" / "CT5N_seg.dcm")
    web = DICOMwebClient(url=root, session=create_session_from_user_pass("alice", "secret"))
    found = web.search_for_series(search_filters={"Modality": "SEG"})
    assert [s["0020000E"]["Value"][0] for s in found] == [local.SeriesInstanceUID]

    # refused for another reason (no DICOMweb root there: 404, before any window) names the URL without the password
    wrong = root.replace("http://", "http://alice:secret@").replace("/dicom-web", "/dicom-wrong")
    output = {"path": "wrong/{stem}_seg.dcm", "chunks": 16, "dicomweb": wrong}
    with pytest.raises(WorkflowError, match=r"^output.dicomweb: http://127\.0\.0\.1:\d+/dicom-wrong is no DICOMweb "
                                            r"root: GET http://127\.0\.0\.1:\d+/dicom-wrong/studies answered 404") as caught:
        tilemask.run(Workflow.from_dict({**base, "output": output}, base_dir=tmp_path), client)
    assert "secret" not in str(caught.value)


def test_segment_labels_dicom_cannot_hold_are_refused_and_others_are_written_in_utf8(make_model, tmp_path, client):
    """A 75-character name gave a SEG pydicom's strict reading refuses; a backslash made two labels of one; a
    non-ASCII name was written in Latin-1 with no SpecificCharacterSet; a series without SeriesInstanceUID ran
    every window, then failed with an AttributeError."""
    from tilemask.errors import WorkflowError
    from tilemask.planning import plan_workflow

    def latin1(ds, k):
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", "Müller^Jörg"

    folder = write_series(tmp_path / "series", rows=20, columns=24, slices=16, mutate=latin1)
    weights, _ = make_model(UNET_3D)
    output = {"path": "out/{stem}_seg.dcm", "chunks": 16}
    for name, why in (("x" * 65, "65 characters, where a DICOM SegmentLabel holds 64"),
                      ("liver\\segment", "a backslash or a control character")):  # fmt: skip
        with pytest.raises(WorkflowError, match=re.escape(why)):
            named = series_workflow(folder, weights, ["background", name], 500.0, 800.0)
            Workflow.from_dict(named | {"output": output})
    workflow = series_workflow(folder, weights, ["background", "Läsion"], 500.0, 800.0) | {"output": output}
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    with pydicom.config.strict_reading():
        dataset = pydicom.dcmread(result.outputs[0])
        assert dataset.SpecificCharacterSet == "ISO_IR 192" and dataset.PatientName == "Müller^Jörg"
        assert [d.SegmentLabel for d in dataset.SegmentSequence][-1] == "Läsion"

    def no_series(ds, k):
        del ds.SeriesInstanceUID

    bare = write_series(tmp_path / "bare", mutate=no_series)
    with pytest.raises(InputError, match="no SeriesInstanceUID, which a DICOM Segmentation must copy"):
        bare_workflow = workflow | {"input": str(bare), "output": {"path": "b/x.dcm"}}
        plan_workflow(Workflow.from_dict(bare_workflow, base_dir=tmp_path))


@pytest.mark.parametrize("charset, name", [
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # \\ISO 2022 IR 87, a Japanese series'
    ("ISO 2022 IR 100", "Müller^Jörg"),  # code extensions, one value
    ("", "Doe^Jane"),  # present and empty: the default repertoire
])  # fmt: skip
def test_a_series_in_a_character_set_highdicom_refuses_gives_a_segmentation_of_its_names(
    charset, name, make_model, tmp_path, client
):
    """highdicom copies the series' SpecificCharacterSet into the SEG and refuses an empty value or one with code
    extensions: each series ran every window, then failed, exit 1 ("ValueError: '' is not a valid
    SpecificCharacterSetValues"; "Encodings with code extensions should not be used when only a single encoding is
    included"). The SEG is written in UTF-8 then (the default repertoire for an empty value), its names as they
    were."""

    def coded(ds, k):
        ds.SpecificCharacterSet, ds.PatientName = charset, name

    folder = write_series(tmp_path / "series", rows=20, columns=24, slices=16, mutate=coded)
    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    workflow["output"] = {"path": "out/{stem}_seg.dcm", "chunks": 16}
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    with pydicom.config.strict_reading():
        dataset = pydicom.dcmread(result.outputs[0])
        assert dataset.get("SpecificCharacterSet") == ("ISO_IR 192" if charset else None)
        assert dataset.PatientName == name


@pytest.mark.parametrize("keyword, value", [
    ("PatientSex", "male"), ("StudyTime", "12:30:00"), ("PatientBirthDate", "00000000"),  # an anonymizer's
])  # fmt: skip
def test_a_patient_or_study_value_highdicom_refuses_is_left_empty_in_the_segmentation(
    keyword, value, make_model, tmp_path, client, caplog
):
    """highdicom converts the first slice's PatientSex (M, F or O), PatientBirthDate, StudyDate and StudyTime as it
    copies them: a PatientSex of 'male', or an ACR-NEMA time '12:30:00' (with colons), ran every window, then failed,
    exit 1 ("ValueError: 'male' is not a valid PatientSexValues"; "Unable to convert non-conformant value '12:30:00'
    to 'TM' object"; "year 0 is out of range"). Those attributes are Type 2: the SEG has them empty, the others
    copied. The warning naming each is given when planning: given on the worker that writes the SEG, it was never
    seen (an embedded cluster's workers write their stderr to /dev/null; `tilemask run` printed nothing)."""

    def nonconformant(ds, k):
        setattr(ds, keyword, value)
        ds.PatientName = "Doe^Jane"

    with pytest.warns(UserWarning, match="Invalid value"):  # pydicom's, as the series is written
        folder = write_series(tmp_path / "series", rows=20, columns=24, slices=16, mutate=nonconformant)
    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    workflow["output"] = {"path": "out/{stem}_seg.dcm", "chunks": 16}
    with caplog.at_level(logging.WARNING, logger="tilemask"):
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    first = DicomSeriesSource.open(str(folder)).files[0]
    warned = rf"{first}: the DICOM SEG leaves {keyword} empty: its {value!r} is no DICOM value \(.+\)"
    assert [r.getMessage() for r in caplog.records if re.fullmatch(warned, r.getMessage())]
    dataset = pydicom.dcmread(result.outputs[0])
    assert keyword in dataset and not dataset[keyword].value and dataset.PatientName == "Doe^Jane"


def test_slices_whose_orientations_differ_within_the_grids_tolerance_give_a_segmentation(make_model, tmp_path, client):
    """Every other slice's ImageOrientationPatient 5e-5 off the others' (within the 1e-4 a series is read as one grid
    with): its NIfTI labels were written, and its SEG ran every window, then failed in highdicom, which wants them
    equal, exit 1 ("ValueError: Source images must have a shared orientation."). The SEG's frames lie on the grid
    the series is read as: one orientation, the first slice's, each frame referring to its slice."""
    import highdicom as hd

    def jitter(ds, k):
        ds.ImageOrientationPatient = [round(float(v), 6) + (5e-5 if k % 2 else 0.0) for v in ds.ImageOrientationPatient]

    folder = write_series(tmp_path / "series", rows=20, columns=24, slices=16, mutate=jitter)
    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    for suffix in (".nii.gz", ".dcm"):
        workflow["output"] = {"path": f"out/{{stem}}{suffix}", "chunks": 16}
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    labels = np.asarray(nib.load(tmp_path / "out" / "series.nii.gz").dataobj)
    seg = hd.seg.segread(tmp_path / "out" / "series.dcm")
    slices = [pydicom.dcmread(f) for f in DicomSeriesSource.open(str(folder)).files]
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose(np.asarray(orientation, float), np.asarray(slices[0].ImageOrientationPatient, float))
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in slices],
                                               combine_segments=True)  # fmt: skip
    np.testing.assert_array_equal(frames, labels.transpose(2, 1, 0))


@pytest.mark.parametrize("keyword", ["FrameOfReferenceUID", "StudyInstanceUID"])
def test_slices_of_two_frames_of_reference_or_studies_are_refused_for_a_segmentation_when_planning(
    keyword, make_model, tmp_path
):
    """Slices of one series, every other one in another frame of reference (or study): its SEG ran every window,
    then failed in highdicom, exit 1, with "Source images must all be part of the same series and must have the same
    image dimensions (number of rows/columns)", naming neither. Refused when planning, naming a slice."""
    from tilemask.planning import plan_workflow

    other = pydicom.uid.generate_uid()

    def split(ds, k):
        if k % 2:
            setattr(ds, keyword, other)

    folder = write_series(tmp_path / "series", rows=20, columns=24, slices=6, mutate=split)
    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    workflow["output"] = {"path": "out/{stem}_seg.dcm"}
    with pytest.raises(InputError, match=rf"^{folder}/slice\d+\.dcm: its {keyword} [0-9.]+ differs from [0-9.]+ of "
                                         rf"{folder}/slice\d+\.dcm; a DICOM Segmentation refers to slices of one study "
                                         "and frame of reference$"):  # fmt: skip
        plan_workflow(Workflow.from_dict(workflow, base_dir=tmp_path))


def test_a_series_without_patient_and_study_details_gives_a_segmentation_that_highdicom_reads(
    make_model, tmp_path, client
):
    """A series without PatientName (or the study's date, ID, ...: Type 2, which may be absent in practice) ran
    every window, then failed in highdicom with "'FileDataset' object has no attribute 'PatientName'", exit 1."""
    import highdicom as hd
    from starlette.testclient import TestClient

    from tilemask.planning import plan_workflow
    from tilemask.serve import create_app

    folder = write_series(tmp_path / "series", rows=20, columns=24, slices=16)
    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    workflow["output"] = {"path": "out/{stem}_seg.dcm", "chunks": 16}
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(result.outputs[0]))
    assert seg.PatientID == "tilemask-test" and seg.PatientName == "" and seg.StudyDate == ""
    with TestClient(create_app(tmp_path / "out"), base_url="http://127.0.0.1") as server:  # listed, to download
        (listed,) = server.get("/", params={"f": "json"}).json()["outputs"]
        assert listed == {"path": Path(result.outputs[0]).name, "id": Path(result.outputs[0]).stem,
                          "kind": "segmentation", "format": "dicom-seg",
                          "segments": [d.segment_label for d in seg.SegmentSequence]}  # fmt: skip
        assert server.get(f"/files/{listed['path']}").content == Path(result.outputs[0]).read_bytes()
    slice_header = pydicom.dcmread(DicomSeriesSource.open(str(folder)).files[0])
    assert seg.StudyInstanceUID == slice_header.StudyInstanceUID
    # without the study's UID there is no SEG to make: refused before any work
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        del ds.StudyInstanceUID
        ds.save_as(path)
    with pytest.raises(InputError, match="no StudyInstanceUID, which a DICOM Segmentation must copy"):
        plan_workflow(Workflow.from_dict({**workflow, "output": {"path": "again/{stem}_seg.dcm"}}, base_dir=tmp_path))
    assert not (tmp_path / "again").exists()


def test_segments_carry_the_class_colours_of_the_other_outputs(make_model, tmp_path, client):
    """The SEG had no RecommendedDisplayCIELabValue: OHIF and Slicer coloured its segments their own way, unlike
    the COG, OME-Zarr, NIfTI colour table and quick look of the same classes."""
    import highdicom as hd

    from tilemask.classes import class_colours

    folder = write_series(tmp_path / "series", rows=20, columns=24, slices=16)
    args = {**UNET_3D, "out_channels": 3}
    weights, _ = make_model(args)
    workflow = series_workflow(folder, weights, ["background", "liver", "lesion"], 500.0, 800.0)
    workflow["model"]["args"] = args
    workflow["output"] = {"path": "out/{stem}_seg.dcm", "chunks": 16}
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    seg = hd.seg.segread(result.outputs[0])
    shown = {v: seg.get_segment_description(v).get("RecommendedDisplayCIELabValue") for v in (1, 2)}
    assert {v: lab and hd.color.CIELabColor.from_dicom_value(lab).to_rgb() for v, lab in shown.items()} == {
        v: class_colours(3)[v][:3] for v in (1, 2)}  # fmt: skip


def test_more_classes_than_segment_numbers_are_refused_before_any_window(tmp_path, client):
    """A network of 65537 classes ran every window, then failed in highdicom ("Segment number must be a positive
    integer below 65536"), exit 1: a LABELMAP's segments are numbered 1 to 65535 (a network of one class, which a SEG
    could not hold either, is refused for every output: test_workflow_guards)."""
    import torch

    from tilemask.errors import WorkflowError

    folder = write_series(tmp_path / "series", rows=4, columns=4, slices=2)
    args = {"in_channels": 1, "out_channels": 65537, "kernel_size": 1}
    weights = tmp_path / "weights.pt"
    torch.save(torch.nn.Conv3d(**args).state_dict(), weights)
    workflow = {
        "version": 1,
        "input": str(folder),
        "model": {"network": "torch.nn:Conv3d", "args": args, "weights": str(weights)},
        "inference": {"roi_size": [2, 2, 2], "device": "cpu"},
        "output": {"path": "out/{stem}_seg.dcm"},
    }
    refused = (r"^output.path out/\{stem\}_seg.dcm holds at most 65535 classes besides the background \(its segments\); "
               r"this network gives 65536$")
    with pytest.raises(WorkflowError, match=refused):
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert not (tmp_path / "out").exists()


def test_outputs_that_cannot_be_written_for_the_input_are_refused_when_planning(make_volume, make_model, tmp_path):
    from tilemask.planning import plan_workflow

    path, _ = make_volume((20, 18, 16))
    weights, _ = make_model(UNET_3D)
    base = {
        "version": 1,
        "input": str(path),
        "model": {"network": "UNet", "args": UNET_3D, "weights": str(weights)},
        "inference": {"roi_size": [16, 16, 16], "device": "cpu"},
    }
    seg = Workflow.from_dict({**base, "output": {"path": "out/{stem}.dcm"}}, base_dir=tmp_path)
    with pytest.raises(InputError, match="refers to the slices of a DICOM series"):
        plan_workflow(seg)
    wrong_unit = Workflow.from_dict(
        {**base, "output": {"path": "out/{stem}.nii.gz"}, "postprocess": {"opening": "30 m"}}, base_dir=tmp_path
    )
    with pytest.raises(InputError, match="'30 m' is not a unit of a volume"):
        plan_workflow(wrong_unit)
    with pytest.raises(InputError, match="give the folder of the series"):
        plan_workflow(Workflow.from_dict({**base, "input": str(next(CT.iterdir())), "output": {"path": "o.nii.gz"}},
                                         base_dir=tmp_path))  # fmt: skip
    assert not (tmp_path / "out").exists()



@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", ["pixel spacing 0", "parallel cosines"])
def test_a_series_whose_voxel_axes_do_not_span_space_is_refused_by_name(fault, tmp_path):
    """A PixelSpacing of 0 gives a singular affine, which failed in nibabel when reoriented ("Unable to find out
    axis") and could not be written into NIfTI labels; ImageOrientationPatient with one direction twice has no slice
    normal to sort the slices along, and was called "not evenly spaced"."""

    def mutate(ds, k):
        if fault == "pixel spacing 0":
            ds.PixelSpacing = [0.0, 1.3]
        else:
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]

    folder = write_series(tmp_path / "series", mutate=mutate)
    why = (rf"^{folder}: its affine \(voxel-to-world matrix\) is not usable: it is singular .*PixelSpacing"
           if fault == "pixel spacing 0" else
           rf"^{folder}/slice\d+.dcm: ImageOrientationPatient \[1, 0, 0, 1, 0, 0\] gives no slice normal")  # fmt: skip
    with pytest.raises(InputError, match=why) as refused:
        DicomSeriesSource.open(str(folder))
    assert refused.value.exit_status == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "syntax", ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.100"], ids=["jpeg-lossless", "mpeg2"]
)
def test_a_series_whose_pixels_no_installed_decoder_reads_is_refused_when_planning(syntax, make_model, tmp_path):
    """A JPEG Lossless series (CT's usual compression) without gdcm or pylibjpeg-libjpeg installed was planned, then
    failed on a worker's first read, exit 1 ("RuntimeError: Unable to decompress ..."); so was a syntax pydicom has
    no decoder for at all (MPEG2)."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    from tilemask.planning import plan_workflow

    try:
        if get_decoder(syntax).is_available:
            pytest.skip(f"a decoder for {syntax} is installed here")
    except NotImplementedError:
        pass

    def compressed(ds, k):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"

    folder = write_series(tmp_path / "series", rows=20, columns=24, slices=16, mutate=compressed)
    why = (rf"^{folder}/slice\d+.dcm: its pixels are stored as .*{re.escape(syntax)}.*, (and no decoder for it is "
           r"installed \(pydicom's plugins: .*\)|which pydicom has no decoder for)$")  # fmt: skip
    with pytest.raises(InputError, match=why) as refused:
        DicomSeriesSource.open(str(folder))
    assert refused.value.exit_status == 2
    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    workflow["output"] = {"path": "out/{stem}_labels.nii.gz"}
    with pytest.raises(InputError, match=why):
        plan_workflow(Workflow.from_dict(workflow, base_dir=tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(30)
def test_a_multi_frame_file_given_as_the_input_is_named_as_one_not_sent_to_its_folder(tmp_path):
    """An Enhanced CT file given as the input was told "give the folder of the series as the input"; its folder was
    then refused for holding a multi-frame image. A .dcm path that does not exist got the same hint."""
    from tilemask.sources import open_source

    folder = write_series(tmp_path / "series", rows=12, columns=20, slices=6)
    files = sorted(folder.iterdir(), key=lambda f: int(pydicom.dcmread(f).InstanceNumber))
    enhanced = pydicom.dcmread(files[0])
    enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    enhanced.NumberOfFrames = len(files)
    enhanced.PixelData = b"".join(pydicom.dcmread(f).PixelData for f in files)
    (tmp_path / "enhanced").mkdir()
    for name in ("ct.dcm", "ct"):  # DICOM SEG's suffix, and none: two formats answer for one file
        path = tmp_path / "enhanced" / name
        enhanced.save_as(path)
        for given in (path, path.parent):
            with pytest.raises(InputError, match=rf"^{path}: a multi-frame image \(6 frames\); tilemask reads series "
                                                 "of single-frame slices$"):  # fmt: skip
                open_source(str(given), 3)
        path.unlink()
    with pytest.raises(InputError, match=rf"^{files[0]}: one DICOM file; give the folder of the series as the input$"):
        open_source(str(files[0]), 3)
    with pytest.raises(InputError, match=rf"^{tmp_path}/missing.dcm: no such file$"):
        open_source(str(tmp_path / "missing.dcm"), 3)


@pytest.mark.timeout(60)
def test_a_failed_store_never_names_the_password_whatever_the_url_looks_like(tmp_path):
    """The password was left out of the message only where requests quoted the URL exactly as given: a host written
    in capitals (``PACS01``, as Windows names machines) or a password that requests percent-encodes (a space) came
    back as requests rewrote the URL, ``http://alice:secret@localhost:PORT/...``, password and all."""
    import http.server
    import threading

    from tilemask.errors import OutputError
    from tilemask.sinks.dicomseg import store

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        slice_ = next(p for p in sorted(CT.iterdir()) if p.is_file())
        for given in (f"http://alice:secret@LOCALHOST:{port}/dicom-web",
                      f"http://alice:se cret@localhost:{port}/dicom-web"):  # fmt: skip
            with pytest.raises(OutputError, match=r"failed: 404 Client Error") as caught:
                store(str(slice_), given)
            assert "secret" not in str(caught.value) and "cret@" not in str(caught.value), str(caught.value)
    finally:
        server.shutdown()
        server.server_close()


class _Answering:
    """A loopback HTTP server whose every request gets ``answer(handler)``: (status, headers, body)."""

    def __init__(self, answer):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # the request's, for answer
                status, headers, body = answer(self)
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any  # noqa: N815 - http.server's names

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [301, 302])
def test_a_dicomweb_url_that_redirects_is_refused_naming_where_to(orthanc, status):
    """A proxy's 301 or 302 in front of Orthanc passed the check (requests followed it), then the store was sent
    on as a GET, Orthanc's QIDO answered a list of studies, and the store failed with "'list' object has no
    attribute 'items'". Refused before any window, naming where it leads (exit 2), and not followed by a store."""
    from tilemask.errors import OutputError, WorkflowError
    from tilemask.sinks.dicomseg import check_answers, store

    def moved(handler):
        return status, {"Location": orthanc + handler.path.removeprefix("/pacs")}, b""

    slice_ = next(p for p in sorted(CT.iterdir()) if p.is_file())
    with _Answering(moved) as proxy:
        given = f"{proxy}/pacs"
        where = rf"{given}/studies(\?limit=1)? answered {status} \w[\w ]+, to {orthanc}/studies(\?limit=1)?: "
        with pytest.raises(WorkflowError, match=rf"^output.dicomweb: {where}give the DICOMweb root there$") as caught:
            check_answers(given)
        assert caught.value.exit_status == 2
        with pytest.raises(OutputError, match=rf"^output.dicomweb: storing {slice_} on {given} failed: {where}"):
            store(str(slice_), given)


@pytest.fixture(scope="module")
def orthanc_dropping(tmp_path_factory):
    """The same Orthanc with a ``ReceivedInstanceFilter`` that drops every instance (its Lua hook for a PACS's
    rules on what it keeps)."""
    lua = tmp_path_factory.mktemp("lua") / "drop.lua"
    lua.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n  return false\nend\n")
    yield from _orthanc(tmp_path_factory, LuaScripts=[str(lua)])


def _store_response(stored: list, failed: list, warning: int | None = None) -> bytes:
    """A Store Instances Response (PS3.18 10.5.3) as DICOM JSON: ``stored`` and ``failed`` SOP Instance UIDs."""
    import json

    from pydicom.dataset import Dataset

    def item(uid, **more):
        ds = Dataset()
        ds.ReferencedSOPClassUID, ds.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", uid
        for keyword, value in more.items():
            setattr(ds, keyword, value)
        return ds

    answer = Dataset()
    answer.ReferencedSOPSequence = [item(u, **({"WarningReason": warning} if warning else {})) for u in stored]
    answer.FailedSOPSequence = [item(u, FailureReason=0xA700) for u in failed]
    return json.dumps(answer.to_json_dict()).encode()


@pytest.mark.timeout(120)
def test_a_segmentation_the_server_does_not_store_is_a_failed_store(orthanc, orthanc_dropping, caplog):
    """A STOW-RS answer listing the instance as failed, with 200 or 202, and Orthanc 1.10's 200 listing an instance
    its ReceivedInstanceFilter dropped, all counted as stored (exit 0). Each is a failed store naming why; a 409
    names the failure reason its body gives; an instance stored with a warning is stored, the warning logged. An
    answer that does not list it, or that dicomweb-client does not read (an empty body, a Content-Type with a
    charset), was a failed store even when the server had stored it: QIDO-RS decides."""
    import json

    from dicomweb_client.api import DICOMwebClient

    from tilemask.errors import OutputError
    from tilemask.sinks.dicomseg import store

    slice_ = next(p for p in sorted(CT.iterdir()) if p.is_file())
    uid = pydicom.dcmread(slice_).SOPInstanceUID
    dicom_json, charset = "application/dicom+json", "application/dicom+json; charset=utf-8"
    stowed = {"Content-Type": dicom_json}
    found = json.dumps([{"00080018": {"vr": "UI", "Value": [uid]}}]).encode()  # QIDO-RS finds it
    dropped = r"it answered that it stored it, and its QIDO-RS does not find it: the server dropped it"
    unlisted, listed, refused = _store_response(["1.2.3"], []), _store_response([uid], []), _store_response([], [uid])
    failed = r"the server lists it as failed \(FailureReason A700H\)"
    cases = {
        (200, dicom_json, refused, found): failed,
        (202, dicom_json, _store_response(["1.2.3"], [uid]), found): failed,
        (200, dicom_json, unlisted, b"[]"): dropped,
        (202, dicom_json, b"", b"[]"): dropped,
        (200, charset, listed, b"[]"): dropped,
        (409, dicom_json, refused, found): r"409 Client Error: Conflict for url: \S+ \(FailureReason A700H\)",
    }
    for (status, content_type, body, qido), why in cases.items():
        answer = (status, {"Content-Type": content_type}, body)
        with _Answering(lambda h: answer if h.command == "POST" else (200, stowed, qido)) as pacs:
            with pytest.raises(OutputError, match=rf"^output.dicomweb: storing {slice_} on {pacs} failed: {why} "):
                store(str(slice_), pacs)
    for status, content_type, body in [(200, dicom_json, unlisted), (202, dicom_json, b""), (200, charset, listed)]:
        answer = (status, {"Content-Type": content_type}, body)
        with _Answering(lambda h: answer if h.command == "POST" else (200, stowed, found)) as pacs:
            store(str(slice_), pacs)  # QIDO-RS finds it: stored

    warned = _store_response([uid], [], warning=0xB000)
    with _Answering(lambda h: (202, stowed, warned) if h.command == "POST" else (200, stowed, found)) as pacs:
        store(str(slice_), pacs)
    assert any(f"stored {uid} with a warning (WarningReason B000H)" in r.getMessage() for r in caplog.records)

    with pytest.raises(OutputError, match=r"failed: it answered that it stored it, and its QIDO-RS does not find it"):
        store(str(slice_), orthanc_dropping)
    assert DICOMwebClient(url=orthanc_dropping).search_for_instances() == []  # Orthanc answered 200, listing it
    store(str(slice_), orthanc)  # and an Orthanc that keeps it: stored
    assert DICOMwebClient(url=orthanc).search_for_instances(search_filters={"SOPInstanceUID": uid}) != []


@pytest.mark.timeout(30)
def test_a_slice_or_a_series_given_to_a_2d_model_is_refused_as_a_volume_not_sent_to_its_folder(tmp_path):
    """A 2D model given one DICOM slice was told "give the folder of the series as the input"; the folder was then
    refused, "has 3 spatial axes but the model is 2D": a DICOM series, a slice's included, is read as a volume."""
    from tilemask.sources import open_source

    folder = write_series(tmp_path / "series", rows=12, columns=20, slices=1)
    (slice_file,) = folder.iterdir()
    for given in (slice_file, folder):
        with pytest.raises(InputError, match=rf"^{given}: a DICOM (slice|series), which tilemask reads as a volume "
                                             r"\(one slice as a slab\), for a 2D model: .*$"):  # fmt: skip
            open_source(str(given), 2)
    assert open_source(str(folder), 3).spatial_shape == (20, 12, 1)  # a 3D model takes it


@pytest.mark.timeout(120)
@pytest.mark.parametrize("given", ["absent", 0.0, None])
def test_one_slice_whose_spacing_between_slices_is_0_or_empty_is_a_slab_of_its_thickness(
    given, make_model, tmp_path, client
):
    """One slice, SliceThickness 2.5: a SpacingBetweenSlices of 0 (an unknown value, as highdicom takes it) or empty
    was read as a 1 mm slab, not the slice's thickness (its volumes in mL 2.5 times too small); the SEG of one slice
    said 1 mm (highdicom's own for a single frame) where the volume is read with 2.5."""

    def spacing(ds, k):
        if given != "absent":
            ds.SpacingBetweenSlices = given

    folder = write_series(tmp_path / "one", rows=20, columns=24, slices=1, step=2.5, mutate=spacing)
    affine = np.asarray(DicomSeriesSource.open(str(folder)).geometry.affine)
    assert np.linalg.norm(affine[:3, 2]) == pytest.approx(2.5)
    measures = segmentation_of(folder, make_model, tmp_path, client).SharedFunctionalGroupsSequence[0]
    assert float(measures.PixelMeasuresSequence[0].SpacingBetweenSlices) == pytest.approx(2.5)


def segmentation_of(folder, make_model, tmp_path, client):
    """The DICOM SEG a run writes of the series in ``folder``, read by highdicom."""
    import highdicom as hd

    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    workflow["output"] = {"path": "out/{stem}_seg.dcm", "chunks": 16}
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    return hd.seg.segread(result.outputs[0])


def no_slice_thickness(ds, k):
    del ds.SliceThickness


@pytest.mark.timeout(120)
def test_a_series_without_slice_thickness_gives_a_segmentation_of_its_slabs(make_model, tmp_path, client):
    """A series without SliceThickness (Type 2, which may be absent in practice) ran every window, then failed in
    highdicom with "'FileDataset' object has no attribute 'SliceThickness'", exit 1; its NIfTI labels were written.
    The SEG's slices are the slabs the series' volume counts: as thick as the slices are apart."""
    folder = write_series(tmp_path / "series", rows=20, columns=24, slices=8, step=2.5, mutate=no_slice_thickness)
    seg = segmentation_of(folder, make_model, tmp_path, client)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(2.5)
    series = sitk.ImageSeriesReader()
    series.SetFileNames([str(f) for f in DicomSeriesSource.open(str(folder)).files])
    volume = seg.get_volume()
    assert volume.spacing == pytest.approx(series.Execute().GetSpacing()[::-1], abs=1e-6)  # (slice, row, column)


def overlapping_slabs_spaced_by_thickness(ds, k):
    ds.SliceThickness = ds.SpacingBetweenSlices = 5.0  # 5 mm slabs every 2.5 mm, the spacing given as the thickness


@pytest.mark.timeout(120)
def test_a_segmentation_states_the_spacing_its_frames_lie_at_not_the_one_a_slice_misstates(
    make_model, tmp_path, client
):
    """The SEG copied the first slice's SpacingBetweenSlices (5 mm) where its frames, on the slices, lie 2.5 mm apart:
    highdicom read the series as a volume, but not its SEG ("Frame positions do not form a regularly-spaced
    volume")."""
    import highdicom as hd

    folder = write_series(tmp_path / "series", rows=20, columns=24, slices=8, step=2.5,
                          mutate=overlapping_slabs_spaced_by_thickness)  # fmt: skip
    seg = segmentation_of(folder, make_model, tmp_path, client)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(2.5) and float(measures.SliceThickness) == 5.0
    series = hd.get_volume_from_series([pydicom.dcmread(f) for f in folder.iterdir()])
    assert seg.get_volume().spacing == pytest.approx(series.spacing, abs=1e-6)


@pytest.mark.timeout(60)
def test_a_real_enhanced_ct_in_its_folder_is_named_as_a_multi_frame_image(tmp_path):
    """A real Enhanced CT (highdicom's legacy conversion of a series: its geometry in the functional groups, no
    ImageOrientationPatient of its own) in its folder was refused as "no ImageOrientationPatient: tilemask needs the
    slice geometry" (an exploratory review), where the README says a multi-frame file is named as one there too."""
    import highdicom as hd

    from tilemask.sources import open_source

    series = write_series(tmp_path / "series", rows=12, columns=20, slices=6)
    slices = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1
    )
    assert "ImageOrientationPatient" not in enhanced and "SharedFunctionalGroupsSequence" in enhanced
    (tmp_path / "enhanced").mkdir()
    path = tmp_path / "enhanced" / "ct.dcm"
    enhanced.save_as(path)
    for given in (path, path.parent):
        with pytest.raises(InputError, match=rf"^{path}: a multi-frame image \(6 frames\); tilemask reads series of "
                                             "single-frame slices$"):  # fmt: skip
            open_source(str(given), 3)


@pytest.mark.timeout(120)
def test_a_dicomweb_search_or_wado_uri_address_of_a_series_is_refused_as_dicomweb_not_a_404(orthanc):
    """A QIDO-RS address copied from a PACS (a study's series, a series' instances) and a WADO-URI address of a
    slice fell through to GDAL: "cannot open raster: HTTP response code: 404" (Orthanc answers HEAD 404, GET 200),
    where the WADO-RS series address says what it is and how to get a folder (an exploratory review)."""
    import httpx

    from tilemask.sources import open_source

    root = orthanc.removesuffix("/dicom-web")
    for path in sorted(p for p in CT.iterdir() if p.is_file()):
        assert httpx.post(f"{root}/instances", content=path.read_bytes()).is_success
    first = pydicom.dcmread(next(p for p in sorted(CT.iterdir()) if p.is_file()), stop_before_pixels=True)
    study, series, sop = first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID
    wado_uri = f"{root}/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}"
    for url, what in ((f"{orthanc}/studies/{study}/series", r"\(QIDO-RS\) search"),
                      (f"{orthanc}/studies/{study}/series/{series}/instances", r"\(QIDO-RS\) search"),
                      (f"{orthanc}/studies/{study}/instances?limit=10", r"\(QIDO-RS\) search"),
                      (f"{orthanc}/studies?PatientID={first.PatientID}", r"\(QIDO-RS\) search"),
                      (wado_uri + "&contentType=application/dicom", r"\(WADO-URI\) slice")):
        assert httpx.get(url).status_code == 200, url  # the server answers each
        with pytest.raises(InputError, match=rf"^{re.escape(url)}: a DICOMweb {what}, which tilemask does not read; "
                                             r"retrieve the series into a folder"):  # fmt: skip
            open_source(url, 3)
    assert for_path("https://host/wado/x.tif?requestType=tile").name == "cog"  # a query that is no WADO-URI's


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packed", ["zip", "tar.gz"])
def test_a_series_archive_whose_slices_end_in_dcm_says_to_extract_it_not_no_such_file(packed, tmp_path):
    """Orthanc's series archive (``/series/ID/archive``) names its slices ``CT000000.dcm``; given as
    ``input: {archive: ...}``, each member was "/vsizip/...zip/.../CT000000.dcm: no such file" (an exploratory
    review), where a member without a suffix is named a DICOM file to extract."""
    import tarfile
    import zipfile

    from tilemask.inputs import archive_items
    from tilemask.sources import open_source

    folder = write_series(tmp_path / "CT", slices=3)
    archive = tmp_path / f"series.{packed}"
    if packed == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(folder.iterdir()):
                zf.write(path, f"PATIENT/CT/{path.name}")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(folder, "PATIENT/CT")
    items = archive_items(str(archive), "*")
    assert len(items) == 3
    for item in items:
        (path,) = item.files
        member = path.rpartition(f"{archive}/")[2]
        assert member.startswith("PATIENT/CT/slice") and member.endswith(".dcm")
        with pytest.raises(InputError, match=rf"^{re.escape(path)}: {re.escape(str(archive))}: its member "
                                             rf"{re.escape(member)} is a DICOM file; a DICOM series is read from its "
                                             r"folder: extract the archive and give the series' folder as the input$"):
            open_source(path, 3)


@pytest.mark.timeout(120)
def test_a_store_the_server_refuses_busy_or_drops_is_tried_once_and_says_why_in_a_line():
    """dicomweb-client tries a request 5 times, 2 to 16 s apart, on a 503 (or 429, 408, 504) and on any error of
    requests (a connection reset, a read timeout): a store a busy server refused failed after 30 s with
    "RetryError[Attempts: 5, Value: <Response [503]>]", and one a stalled server never answered took 130 s
    (an exploratory review). One try: the server's answer or the error, in its line; --retry-failed stores again."""
    import time

    from tilemask.errors import OutputError
    from tilemask.sinks.dicomseg import store

    slice_ = next(p for p in sorted(CT.iterdir()) if p.is_file())
    posts = []

    def busy(handler):
        if handler.command == "GET":
            return 200, {"Content-Type": "application/dicom+json"}, b"[]"
        posts.append(time.monotonic())
        return 503, {}, b""

    def dropped(handler):
        if handler.command == "GET":
            return 200, {"Content-Type": "application/dicom+json"}, b"[]"
        posts.append(time.monotonic())
        raise ConnectionResetError("dropped")  # http.server closes the connection, unanswered

    for answer, why in ((busy, r"503 Server Error: Service Unavailable for url: \S+/studies"),
                        (dropped, r"\('Connection aborted.', RemoteDisconnected\(.*\)\)")):  # fmt: skip
        posts.clear()
        started = time.monotonic()
        with _Answering(answer) as pacs:
            with pytest.raises(OutputError, match=rf"^output.dicomweb: storing {slice_} on {pacs} failed: {why} \(the "
                                                  r"file is whole and kept\)$"):  # fmt: skip
                store(str(slice_), pacs)
        assert len(posts) == 1 and time.monotonic() - started < 10, (answer.__name__, len(posts))


@pytest.mark.slow  # 26 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
def test_a_store_waits_its_own_two_minutes_for_the_answer_not_dicomweb_clients_20_s():
    """dicomweb-client 0.61 gives each request its own timeout, 20 s, which replaced tilemask's (10 s to connect,
    120 s for each answer): a server that took 25 s to answer a store (a large SEG) failed with "Read timed out.
    (read timeout=20)" (an exploratory review). Stored now."""
    import json
    import time

    from tilemask.sinks.dicomseg import store

    slice_ = next(p for p in sorted(CT.iterdir()) if p.is_file())
    uid = pydicom.dcmread(slice_).SOPInstanceUID
    found = json.dumps([{"00080018": {"vr": "UI", "Value": [uid]}}]).encode()  # QIDO-RS finds it
    stowed = {"Content-Type": "application/dicom+json"}

    def slow(handler):
        if handler.command == "POST":
            time.sleep(25)
            return 200, stowed, _store_response([uid], [])
        return 200, stowed, found

    with _Answering(slow) as pacs:
        store(str(slice_), pacs)


@pytest.mark.timeout(60)
def test_the_series_of_a_disc_are_listed_by_the_file_s_path_in_the_folder_given(tmp_path):
    """A disc's (or a PACS export's) folders, PATIENT/STUDY/SERIES, name their slices alike in each series: the
    folder given at its root was refused listing each series "such as IM0000.dcm", which did not say which folder
    to give (an exploratory review). Each is named by its path in the folder given."""
    for series in ("SE0", "SE1"):  # one seed: the same file names
        write_series(tmp_path / "disc" / "PT0" / "ST0" / series, slices=4, seed=0)
    names = [sorted(p.name for p in (tmp_path / "disc" / "PT0" / "ST0" / s).iterdir()) for s in ("SE0", "SE1")]
    assert names[0] == names[1]
    uids = [pydicom.dcmread(next((tmp_path / "disc" / "PT0" / "ST0" / s).iterdir())).SeriesInstanceUID
            for s in ("SE0", "SE1")]  # fmt: skip
    listed = "; ".join(f"{uid} (CT, 4 file(s), such as PT0/ST0/{series}/{names[0][0]})"
                       for uid, series in zip(uids, ("SE0", "SE1")))  # fmt: skip
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path / 'disc'))}: holds 2 DICOM series; give the "
                                         rf"folder of one series: {re.escape(listed)}$"):  # fmt: skip
        DicomSeriesSource.open(str(tmp_path / "disc"))


@pytest.mark.timeout(60)
def test_a_dicom_slice_on_a_web_server_or_object_storage_says_to_download_the_series_not_no_such_file(tmp_path):
    """A slice given by its URL (a web server's, ``s3://``) was "no such file" (an exploratory review): tilemask
    looked for it on the local disk. It is named as a DICOM file to download with its series into a folder."""
    import functools
    import http.server
    import threading

    from tilemask.sources import open_source

    series = write_series(tmp_path / "CT", slices=3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/CT/{next(series.iterdir()).name}"
        for given in (url, f"/vsicurl/{url}", "s3://bucket/CT/slice1.dcm"):
            with pytest.raises(InputError, match=rf"^{re.escape(given)}: a DICOM file on a web server or object "
                                                 r"storage; tilemask reads a DICOM series from a local folder: "
                                                 r"download the series' slices into a folder and give the folder$"):
                open_source(given, 3)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(120)
def test_a_pacs_whose_certificate_is_not_trusted_here_is_refused_naming_it_and_trusted_through_requests_ca_bundle(
    tmp_path, monkeypatch
):
    """A hospital PACS's HTTPS with its own CA: the check said the server "does not answer" (exit 1: as if down for
    now), with requests' SSLError, where it answered with a certificate not trusted here, which a rerun does not
    change (an exploratory review). One line naming the certificate and REQUESTS_CA_BUNDLE, exit 2; with it, the
    check passes."""

    from tilemask.errors import WorkflowError
    from tilemask.sinks.dicomseg import check_answers

    certificate = _self_signed(tmp_path, "own", "127.0.0.1")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with _dicomweb_server(certificate=certificate) as root:
        with pytest.raises(WorkflowError, match=rf"^output.dicomweb: {re.escape(root)}: its TLS certificate is not "
                                                r"trusted here \(.*certificate verify failed: self-signed certificate"
                                                r".*\): give its CA's certificate in REQUESTS_CA_BUNDLE$"):  # fmt: skip
            check_answers(root)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
        check_answers(root)  # trusted: nothing to say


@pytest.mark.timeout(120)
def test_the_advice_to_give_a_user_and_password_survives_the_command_lines_hiding_of_passwords(
    make_model, tmp_path, orthanc_with_users
):
    """``tilemask run`` hides every URL's password in what it prints: the advice for a server that wants a user and
    password read "give them in the URL, https://USER:***@HOST/..." (an exploratory review)."""
    weights, _ = make_model(UNET_3D)
    workflow = {**series_workflow(CT, weights, ["background", "brain"], 100.0, 100.0),
                "output": {"path": "out/{stem}_seg.dcm", "chunks": 16, "dicomweb": orthanc_with_users}}  # fmt: skip
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(workflow))
    result = run_cli("-q", "run", tmp_path / "w.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "***" not in result.stderr, result.stderr
    assert result.stderr.strip().endswith("wants a user and password (401 Unauthorized): give them in the URL, as "
                                          "USER:PASSWORD@ before its host"), result.stderr  # fmt: skip


def _self_signed(folder, name: str, host: str, days: tuple[int, int] = (-1, 1)):
    """A certificate for ``host`` (an IP address or a DNS name), valid from ``days[0]`` to ``days[1]`` from now."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        alt = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1]))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


@pytest.mark.timeout(120)
def test_a_pacs_certificate_for_another_host_or_out_of_date_is_not_sent_to_requests_ca_bundle(tmp_path, monkeypatch):
    """Only an untrusted CA is mended by REQUESTS_CA_BUNDLE. A certificate for another host, its CA trusted in
    REQUESTS_CA_BUNDLE, read "its TLS certificate is not trusted here (certificate verify failed: IP address
    mismatch, certificate is not valid for): give its CA's certificate in REQUESTS_CA_BUNDLE" (the host cut off,
    the advice already followed), an expired one was sent there too, and a server speaking plain HTTP on the
    https:// URL's port was "TLS failed: HTTPSConnectionPool(host=..., port=...): Max retries exceeded ..." (exit 1,
    as if down for now). An exploratory review."""

    from tilemask.errors import WorkflowError
    from tilemask.sinks.dicomseg import check_answers

    other = _self_signed(tmp_path, "other", "pacs.example")
    expired = _self_signed(tmp_path, "old", "127.0.0.1", (-9, -2))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other[0]))
    with _dicomweb_server(certificate=other) as root:
        with pytest.raises(WorkflowError, match=rf"^output.dicomweb: {re.escape(root)}: its TLS certificate is for "
                                                r"another host \(IP address mismatch, certificate is not valid for "
                                                r"'127.0.0.1'\): give the host name its certificate names$") as caught:
            check_answers(root)
        assert caught.value.exit_status == 2
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(expired[0]))
    with _dicomweb_server(certificate=expired) as root:
        with pytest.raises(WorkflowError, match=rf"^output.dicomweb: {re.escape(root)}: its TLS certificate is out of "
                                                r"date \(certificate has expired\)$"):  # fmt: skip
            check_answers(root)
    with _dicomweb_server() as plain:
        root = plain.replace("http://", "https://")  # an https:// URL of a server that speaks plain HTTP
        with pytest.raises(WorkflowError, match=rf"^output.dicomweb: {re.escape(root)}: it answers without TLS "
                                                r"\(\[SSL: WRONG_VERSION_NUMBER\] wrong version number\): is it "
                                                r"http://\?$"):  # fmt: skip
            check_answers(root)


@pytest.mark.timeout(60)
def test_a_requests_ca_bundle_that_is_not_there_or_holds_no_certificate_is_named(tmp_path, monkeypatch):
    """REQUESTS_CA_BUNDLE naming no file made ``tilemask run`` end "OSError: Could not find a suitable TLS CA
    certificate bundle, invalid path: ..." (exit 1, as if the server were down for now), and one that holds no
    certificate "HTTPSConnectionPool(...): Max retries exceeded ... NO_CERTIFICATE_OR_CRL_FOUND" (an exploratory
    review). Each is named, exit 2."""
    import socket

    from tilemask.errors import WorkflowError
    from tilemask.sinks.dicomseg import check_answers

    listening = socket.create_server(("127.0.0.1", 0))  # takes the connection: the CA file is read before TLS
    root = f"https://127.0.0.1:{listening.getsockname()[1]}/dicom-web"
    missing, junk = tmp_path / "missing.pem", tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(missing))
    with pytest.raises(WorkflowError, match=rf"^output.dicomweb: {re.escape(root)}: the CA certificates given in "
                                            rf"REQUESTS_CA_BUNDLE, {re.escape(str(missing))}, are not there$"):
        check_answers(root)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(junk))
    with pytest.raises(WorkflowError, match=rf"^output.dicomweb: {re.escape(root)}: the CA certificates given in "
                                            rf"REQUESTS_CA_BUNDLE, {re.escape(str(junk))}, are not read: "
                                            r"\[X509: NO_CERTIFICATE_OR_CRL_FOUND\] no certificate or crl found$"):
        check_answers(root)
    listening.close()


@pytest.mark.timeout(60)
def test_a_dicomweb_address_is_named_for_what_it_is_query_and_fragment_aside():
    """A QIDO-RS search was named a "(WADO-RS) study or series", a WADO-URI slice whose URL ends in a fragment a
    "(WADO-RS) study or series" too, and a search of a PACS's studies (``.../studies?PatientID=...``) fell through
    to GDAL (a review), as did the root's searches of all series or instances (``.../series?Modality=CT``)."""
    from tilemask.sources import open_source

    pacs, uid = "https://pacs.example/dicom-web", "1.2.840.1"
    for url, what in ((f"{pacs}/studies/{uid}/series/{uid}", "(WADO-RS) study or series"),
                      (f"{pacs}/studies/{uid}/series?Modality=CT", "(QIDO-RS) search"),
                      (f"{pacs}/studies/{uid}/series/{uid}/instances", "(QIDO-RS) search"),
                      (f"{pacs}/studies?PatientID=7", "(QIDO-RS) search"),
                      (f"{pacs}/studies/", "(QIDO-RS) search"),
                      (f"{pacs}/studies/{uid}/instances", "(QIDO-RS) search"),
                      (f"{pacs}/series?Modality=CT", "(QIDO-RS) search"),  # PS3.18's searches of all series
                      (f"{pacs}/instances?SOPClassUID={uid}", "(QIDO-RS) search"),  # and of all instances
                      (f"https://pacs.example/wado?studyUID={uid}&requestType=WADO#top", "(WADO-URI) slice")):
        assert for_path(url).name == "dicom", url
        with pytest.raises(InputError, match=rf"^{re.escape(url)}: a DICOMweb {re.escape(what)}, which tilemask does "
                                             r"not read; retrieve the series into a folder"):  # fmt: skip
            open_source(url, 3)
    assert for_path("https://tiles.example/data/studies/area.tif").name == "cog"
    assert for_path("https://tiles.example/data/series/area.tif").name == "cog"


@pytest.mark.slow  # a run writing DICOM SEG (24 s)
@pytest.mark.timeout(120)
def test_a_series_off_its_grid_is_warned_of_once_by_a_run_writing_a_seg(make_model, tmp_path):
    """A series whose positions are rounded to 0.01 mm (read as its regular grid, with a warning): a run writing
    DICOM SEG printed the warning twice, the series opened again for the SEG's references."""

    def rounded(ds, k):
        ds.ImagePositionPatient = [round(float(v), 2) for v in ds.ImagePositionPatient]

    folder = write_series(tmp_path / "rounded", slices=9, step=0.625, mutate=rounded)
    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    workflow["output"] = {"path": "out/{stem}_seg.dcm"}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(workflow))
    result = run_cli("run", tmp_path / "w.yaml", "--no-progress", cwd=tmp_path, timeout=100)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("slices depart from a regular grid") == 1, result.stderr
    assert (tmp_path / "out" / "rounded_seg.dcm").is_file()
