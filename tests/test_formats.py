"""Conformance suite every writable format passes (as zarr ships one for its stores).

Chunks are written in random order from two worker processes; commit must read
back exactly what was written; abort leaves nothing; a crash (no commit, no
abort) leaves nothing that reads as finished, and the next run's lock removes it.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from tilemask.errors import InputError
from tilemask.formats import FORMATS, for_output
from tilemask.geometry import RasterGeometry, VolumeGeometry
from tilemask.outputs import OutputLock, new_run_id
from tilemask.sinks import OutputLayout
from tilemask.sources.labels import open_labels

# A DICOM Segmentation holds labels only, of a DICOM series input: tests/test_dicom.py writes it from a real series.
WRITABLE = [
    (f.name, s, d) for f in FORMATS if f.writable and f.name != "dicom-seg" for s in f.suffixes[:1] for d in f.spatial_dims
]
CLASSES = ("background", "water", "land")


def layout_for(ndim: int, reference: str) -> OutputLayout:
    shape, chunks = ((70, 90), (32, 40)) if ndim == 2 else ((21, 17, 13), (8, 8, 6))
    geometry = (
        RasterGeometry("EPSG:32618", (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
        if ndim == 2
        else VolumeGeometry(((0.0, -1.2, 0.0, 40.0), (0.9, 0.0, 0.0, -30.0), (0.0, 0.0, 2.5, 10.0), (0.0, 0.0, 0.0, 1.0)))
    )
    return OutputLayout(
        shape=shape, chunks=chunks, class_names=CLASSES, labels_dtype="uint8", probability_channels=3,
        probabilities_dtype="float32", geometry=geometry, reference=reference, nodata=255, run_id=new_run_id(),
    )  # fmt: skip


def regions(layout: OutputLayout) -> list:
    axes = [[(lo, min(lo + c, s)) for lo in range(0, s, c)] for s, c in zip(layout.shape, layout.chunks)]
    grid = np.stack(np.meshgrid(*[range(len(a)) for a in axes], indexing="ij"), -1).reshape(-1, len(axes))
    return [tuple(axes[a][i] for a, i in enumerate(index)) for index in grid]


def expected(layout: OutputLayout):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, layout.shape).astype("uint8")
    labels.flat[rng.integers(0, labels.size, 50)] = 255
    probabilities = rng.random((3, *layout.shape), dtype=np.float32)
    return labels, probabilities


def started(tmp_path, suffix: str, ndim: int):
    """``(path, format, layout, created sink, labels, probabilities)`` of a fresh output."""
    path = str(tmp_path / f"out{suffix}")
    fmt = for_output(path)
    layout = layout_for(ndim, path)
    sink = fmt.make_sink(path, layout)
    sink.create()
    return path, fmt, layout, sink, *expected(layout)


def write(sink, labels, probabilities, chunks, client):
    tasks = []
    for region in chunks:
        index = tuple(slice(lo, hi) for lo, hi in region)
        tasks.append(client.submit(sink.write, region, labels[index], probabilities[(slice(None), *index)], pure=False))
    client.gather(tasks)


@pytest.mark.parametrize("name,suffix,ndim", WRITABLE)
def test_random_order_from_two_processes_reads_back_exactly(tmp_path, client, name, suffix, ndim):
    path, fmt, layout, sink, labels, probabilities = started(tmp_path, suffix, ndim)
    chunks = regions(layout)
    random.Random(0).shuffle(chunks)
    write(sink, labels, probabilities, chunks, client)
    assert len({w for w in client.scheduler_info()["workers"]}) == 2
    written = sink.commit()
    assert written == fmt.files(path, probabilities=True)
    assert fmt.written_by_tilemask(path) and fmt.is_complete(path)
    image = open_labels(path)
    np.testing.assert_array_equal(image.array.compute(), labels)
    assert tuple(image.class_names or CLASSES) == CLASSES
    probs_path = fmt.probabilities_path(path)
    if probs_path is None:
        import zarr

        group = zarr.open_group(path, mode="r")
        stored = group[fmt.probabilities_key(group)][:]
    elif name == "nifti":
        import nibabel as nib

        stored = np.moveaxis(np.asarray(nib.load(probs_path).dataobj), -1, 0)
    else:
        import rasterio

        with rasterio.open(probs_path) as ds:
            stored = ds.read()
    np.testing.assert_array_equal(stored, probabilities)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


@pytest.mark.parametrize("name,suffix,ndim", WRITABLE)
def test_abort_leaves_nothing(tmp_path, client, name, suffix, ndim):
    _, _, layout, sink, labels, probabilities = started(tmp_path, suffix, ndim)
    write(sink, labels, probabilities, regions(layout)[:2], client)
    sink.abort()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name,suffix,ndim", WRITABLE)
def test_a_crash_leaves_nothing_that_reads_as_finished(tmp_path, client, name, suffix, ndim):
    path, fmt, layout, sink, labels, probabilities = started(tmp_path, suffix, ndim)
    write(sink, labels, probabilities, regions(layout), client)  # every chunk, then the process "dies"
    assert not os.path.exists(path)
    with pytest.raises(InputError):
        open_labels(path)
    assert os.listdir(tmp_path), "the crash left its staged files"
    with OutputLock(fmt.files(path, probabilities=True)):  # the next run of this output
        assert [n for n in os.listdir(tmp_path) if not n.startswith(".tilemask-lock-")] == []
    assert os.listdir(tmp_path) == []


def test_the_output_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    from tilemask.errors import OutputConflict

    files = [str(tmp_path / "out.zarr"), str(tmp_path / "stats.csv")]
    with OutputLock(files):
        with pytest.raises(OutputConflict, match="being written by another tilemask run"):
            OutputLock(files[1:]).acquire()
        with pytest.raises(OutputConflict, match=r"stats.csv \(with .*/a.tif, the labels\) is being written"):
            OutputLock([str(tmp_path / "a.tif"), files[1]]).acquire()  # free labels, held statistics: named both
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tilemask.outputs import OutputLock; "
         "OutputLock(sys.argv[1:]).acquire(); print('held', flush=True); time.sleep(60)", *files],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputConflict):
            OutputLock(files).acquire()
        holder.kill()
        holder.wait(timeout=30)
        with OutputLock(files):  # the kernel dropped the dead holder's lock
            pass
    finally:
        holder.kill()
    assert os.listdir(tmp_path) == []


def test_an_output_set_aside_by_an_interrupted_swap_is_put_back(tmp_path):
    from tilemask.outputs import ASIDE, staged_path

    path = tmp_path / "out.zarr"
    aside = staged_path(path, new_run_id()) + ASIDE  # what publish() leaves if killed between its two renames
    os.makedirs(os.path.join(aside, "labels"))
    with OutputLock([str(path)]):
        assert os.path.isdir(path / "labels")
    assert os.listdir(tmp_path) == ["out.zarr"]


def test_the_folders_a_lock_and_a_check_make_are_noted_and_only_the_empty_ones_removed(tmp_path):
    """What a refused run removes is what its locks and output checks made, as they made it (``made``): the
    folders already there (the user's) are not noted, and a made folder something was put in since stays, with
    the folders above it."""
    from tilemask.outputs import check_outputs, remove_made

    (tmp_path / "mine").mkdir()
    labels, table = tmp_path / "mine/out/a/x.zarr", tmp_path / "mine/out/b/c/x.csv"
    made = []
    with OutputLock([str(labels), str(table)], made=made):
        check_outputs([(str(labels), True), (str(table), True)], [], overwrite=False, made=made)
    assert made == [tmp_path / "mine/out", tmp_path / "mine/out/a", tmp_path / "mine/out/b", tmp_path / "mine/out/b/c"]
    (tmp_path / "mine/out/a/kept.txt").write_text("")  # written meanwhile by someone else
    remove_made(made)
    assert made == []
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "mine", "mine/out", "mine/out/a", "mine/out/a/kept.txt"]  # fmt: skip
    made = []
    check_outputs([(str(labels), True)], [], overwrite=False, made=made)  # there now: nothing made, nothing noted
    assert made == []


def test_one_listing_per_folder_finds_the_leftovers_a_listing_per_output_finds(tmp_path):
    """A run of many inputs lists each output folder once (FolderListings); it must find what listing the
    folder for each output finds, names that could belong to two outputs included."""
    from tilemask.outputs import FolderListings, leftovers

    names = [
        ".tilemask-0a1b-x.tif", ".tilemask-0a1b-x.tif.parts", ".tilemask-ff-x.tif.aux.xml", ".tilemask-ff-x.tif.old",
        ".tilemask-12-x.tif.aux.xml.done", ".tilemask-9-cafe-x.tif", ".tilemask-lock-x.tif", ".tilemask-zz-x.tif",
        ".tilemask-3-y.zarr.raw.zarr", ".tilemask-3-y.zarr", "x.tif", "x.tif.aux.xml", ".tilemask-4-x.tif.aux.xml.parts",
    ]  # fmt: skip
    for name in names:
        (tmp_path / name).touch()
    listings = FolderListings()
    for output in ("x.tif", "x.tif.aux.xml", "cafe-x.tif", "y.zarr", "z.tif"):
        expected = sorted(leftovers(tmp_path / output))
        assert sorted(listings.leftovers(tmp_path / output)) == expected, output
    assert len(leftovers(tmp_path / "x.tif")) == 4 and len(leftovers(tmp_path / "x.tif.aux.xml")) == 3


def test_a_urls_query_is_not_its_stem_and_a_files_question_mark_is():
    """A zip member ``b #1?.tif`` was written as ``b #1_mask.tif``: the "?" of a URL's query was cut from any name."""
    from tilemask.formats import stem

    assert stem("https://example.com/scenes/scene.tif?X-Amz-Credential=a/b&sig=1") == "scene"
    assert stem("/vsicurl/https://example.com/scene.tif?token=x") == "scene"
    assert stem("/vsizip//data/scenes.zip/日本/b #1?.tif") == "b #1?"
    assert stem("/data/what?.nii.gz") == "what?"



def test_a_url_inputs_name_is_percent_decoded_and_an_outputs_url_is_not():
    """A URL input's {stem} is its name as written: sc%C3%A8ne%20%231.tif wrote sc%C3%A8ne%20%231_mask.tif. The
    path of an output read back over HTTP keeps its encoding (the probabilities beside a COG: decoded, its "#"
    became the URL's fragment, a review's)."""
    from tilemask.formats import for_path
    from tilemask.inputs import input_name

    assert input_name("http://example.com/dir%20a/sc%C3%A8ne%20%231%20(copy)%3F.tif") == "scène #1 (copy)?"
    assert input_name("/vsicurl/https://example.com/a%2Fb%00c.tif?sig=1") == "a_b_c"
    assert input_name("/data/sc%C3%A8ne.tif") == "sc%C3%A8ne"  # a file's own name
    assert input_name("https://example.com/.hidden.tif") == "_hidden"
    cog = "https://example.com/out/sc%C3%A8ne%20%231_mask.tif"
    assert for_path(cog).probabilities_path(cog) == "https://example.com/out/sc%C3%A8ne%20%231_mask_probabilities.tif"
