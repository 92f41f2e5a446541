"""OME-Zarr (NGFF 0.5) out and in, checked by ome-zarr-models (validation) and ome-zarr's reader (napari's)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

import tilemask
from tests.conftest import UNET_2D, UNET_3D, raster_workflow, run_small_volume
from tests.range_server import serve
from tilemask.classes import class_colours
from tilemask.sinks.omezarr import SMALLEST
from tilemask.workflow import Workflow


def mode_of_cells(labels: np.ndarray) -> np.ndarray:
    """The reference: the most frequent of the real values of each 2 x 2 cell (ties: the smallest), counted one
    cell at a time; an edge cell of an odd axis holds one or two real values."""
    from collections import Counter

    out = np.zeros(tuple((s + 1) // 2 for s in labels.shape), labels.dtype)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            counts = Counter(labels[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].ravel().tolist())
            out[r, c] = min(counts, key=lambda v: (-counts[v], v))
    return out


def labels_multiscale(root: zarr.Group) -> dict:
    """The multiscale of the labels of an OME-Zarr output, once ome-zarr-models has validated them."""
    ImageLabel.from_zarr(root["labels/labels"])
    (multiscale,) = dict(root["labels/labels"].attrs)["ome"]["multiscales"]
    return multiscale


def test_labels_as_a_multiscale_label_image_that_validates_and_reads_as_napari_does(
    make_raster, make_model, tmp_path, client
):
    path, _ = make_raster(shape=(3, 601, 699))  # odd: the levels' edge cells hold fewer real pixels
    weights, _ = make_model(UNET_2D)
    outputs = {}
    for suffix in (".zarr", ".ome.zarr"):
        wf = Workflow.from_dict(
            raster_workflow(path, weights, classes=["background", "water", "cloud"],
                            output={"path": f"out/{{stem}}{suffix}", "probabilities": "uint8", "chunks": 256,
                                    "quicklook": suffix == ".ome.zarr"},
                            inference={"backend": "torch"}),  # auto may settle on another between the two runs
            base_dir=tmp_path,
        )  # fmt: skip
        (result,) = tilemask.run(wf, client)
        outputs[suffix] = result.outputs[0]
    omz = outputs[".ome.zarr"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [Path(path).stem + ".png"]  # not *.ome.png
    root = zarr.open_group(omz, mode="r")
    image = Image.from_zarr(root)  # raises on anything NGFF 0.5 does not allow
    label = ImageLabel.from_zarr(root["labels/labels"])
    datasets = [d.path for d in image.attributes.ome.multiscales[0].datasets]
    assert datasets == ["0", "1", "2"] and max(root["2"].shape[1:]) <= SMALLEST
    colours = {c.label_value: tuple(c.rgba) for c in label.attributes.ome.image_label.colors}
    assert colours == class_colours(3)  # background transparent, then the palette; no nodata in this scene

    plain = zarr.open_group(outputs[".zarr"], mode="r")
    level0 = np.asarray(root["labels/labels/0"])
    np.testing.assert_array_equal(level0, np.asarray(plain["labels"]))  # the same run, the same labels
    np.testing.assert_array_equal(np.asarray(root["0"]), np.asarray(plain["probabilities"]))
    level1 = np.asarray(root["labels/labels/1"])
    np.testing.assert_array_equal(level1, mode_of_cells(level0))  # edges included
    np.testing.assert_array_equal(np.asarray(root["labels/labels/2"]), mode_of_cells(level1))

    nodes = list(Reader(parse_url(omz))())
    (labels_node,) = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert any(isinstance(s, Multiscales) for s in labels_node.specs)
    np.testing.assert_array_equal(np.asarray(labels_node.data[0]), level0)
    names = {value: p["class"] for value, p in labels_node.metadata["properties"].items()}  # the reader keys by value
    assert [names[v] for v in range(3)] == ["background", "water", "cloud"]
    levels = labels_node.metadata["coordinateTransformations"]
    with rasterio.open(path) as ds:
        size = np.array([ds.res[1], ds.res[0]])  # the raster's pixel size (rows, columns)
    assert [t["type"] for t in levels[0]] == ["scale"]  # rows run south: no origin
    # each coarser level where ome-zarr's writer puts a level binning 2 x 2 cells of the one before (shapes of
    # exact halves, as its factors are the shapes' ratios): the centre of its first cell, not level 0's
    reference = FormatV05().generate_coordinate_transformations([(4, 4), (2, 2), (1, 1)])
    for level, (scale, translation) in enumerate(reference):
        np.testing.assert_allclose(levels[level][0]["scale"], np.multiply(scale["scale"], size))
        if level:
            np.testing.assert_allclose(levels[level][1]["translation"], np.multiply(translation["translation"], size))

    labels = tilemask.open_result(omz)
    assert labels.attrs["class_names"] == ["background", "water", "cloud"] and labels.rio.crs is not None
    np.testing.assert_array_equal(np.asarray(labels), level0)
    probabilities = tilemask.open_result(omz, "probabilities")
    assert probabilities.shape == (3, *level0.shape)


@pytest.mark.parametrize("unit", ["millimeter", "micrometer"])
def test_volume_scale_is_the_voxel_size_and_an_ome_zarr_input_keeps_it(make_volume, make_model, tmp_path, client, unit):
    """A micrometre input's labels were written in millimetres (scale 0.0025 for 2.5 um): napari places layers by
    their numbers, so they landed at a thousandth of the scan."""
    _, volume = make_volume((40, 36, 30))
    weights, _ = make_model(UNET_3D)
    source = tmp_path / "scan.ome.zarr"
    group = zarr.open_group(source, mode="w", zarr_format=3)
    scale, translation = [2.5, 1.2, 0.9], [-50.0, 12.0, 7.0]
    group.create_array("s0", data=volume, chunks=(20, 20, 20), dimension_names=("z", "y", "x"))
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "axes": [{"name": n, "type": "space", "unit": unit} for n in "zyx"],
            "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": scale},
                                                                      {"type": "translation", "translation": translation}]}],
        }],
    }  # fmt: skip
    Image.from_zarr(zarr.open_group(source, mode="r"))  # a valid NGFF 0.5 image
    root = zarr.open_group(run_small_volume(source, weights, tmp_path, client, ".ome.zarr"), mode="r")
    Image.from_zarr(root)
    multiscale = labels_multiscale(root)
    assert [a["unit"] for a in multiscale["axes"]] == [unit] * 3
    assert [a["name"] for a in multiscale["axes"]] == ["z", "y", "x"]  # named as the input named them
    transforms = multiscale["datasets"][0]["coordinateTransformations"]
    assert transforms[0]["scale"] == pytest.approx(scale)
    assert transforms[1]["translation"] == pytest.approx(translation)  # where napari puts the scan, the labels
    # the input's grid is its scale, each axis on the world axis it is named after: array axis 0 (z) is world z
    expected = np.zeros((3, 4))
    expected[2, 0], expected[1, 1], expected[0, 2] = scale
    expected[2, 3], expected[1, 3], expected[0, 3] = translation
    in_mm = {"millimeter": 1.0, "micrometer": 1e-3}[unit]  # tilemask's own affine is in mm, as its statistics are
    np.testing.assert_allclose(np.asarray(dict(root.attrs)["affine"])[:3], expected * in_mm)
    assert np.asarray(root["labels/labels/0"]).shape == volume.shape
    if unit == "micrometer":  # the input given by its level's path: its group's unit, not mm (napari: 1/1000)
        (tmp_path / "out").rename(tmp_path / "whole")
        level = zarr.open_group(run_small_volume(source / "s0", weights, tmp_path, client, ".ome.zarr"), mode="r")
        assert labels_multiscale(level) == multiscale


def test_an_image_ome_zarr_input_keeps_its_scale_and_translation(make_model, tmp_path, client):
    """A 2D OME-Zarr (a microscopy image: no CRS) gives labels with its pixel size and origin, so napari lays
    them on it; they had a scale of 1 and no translation."""
    image = (np.random.default_rng(2).random((3, 90, 110)) * 255).astype(np.uint8)
    source = tmp_path / "cells.ome.zarr"
    group = zarr.open_group(source, mode="w", zarr_format=3)
    group.create_array("0", data=image, chunks=(3, 64, 64), dimension_names=("c", "y", "x"))
    scale, translation = [1.0, 0.5, 0.5], [0.0, 100.0, 200.0]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "axes": [{"name": "c", "type": "channel"}]
                    + [{"name": n, "type": "space", "unit": "micrometer"} for n in "yx"],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale},
                                                                     {"type": "translation", "translation": translation}]}],
        }],
    }  # fmt: skip
    Image.from_zarr(zarr.open_group(source, mode="r"))
    weights, _ = make_model(UNET_2D)
    wf = raster_workflow(source, weights, output={"path": "out/{stem}_labels.ome.zarr", "chunks": 64})
    (result,) = tilemask.run(Workflow.from_dict(wf, base_dir=tmp_path), client)
    root = zarr.open_group(result.outputs[0], mode="r")
    multiscale = labels_multiscale(root)
    assert multiscale["axes"] == [{"name": n, "type": "space", "unit": "micrometer"} for n in "yx"]  # was unit-less
    transforms = multiscale["datasets"][0]["coordinateTransformations"]
    assert transforms == [{"type": "scale", "scale": scale[1:]},
                          {"type": "translation", "translation": translation[1:]}]  # fmt: skip


def test_a_rasters_translation_is_the_centre_of_its_first_pixel_as_ngff_and_a_volumes_are(make_model, tmp_path,
                                                                                             client):
    """A raster whose rows run the positive way (a south-up GeoTIFF, y growing down the rows) gave its OME-Zarr
    labels its geotransform's corner as the translation, where NGFF (and a volume's, from the NIfTI affine) places
    pixel (0, 0)'s centre: napari laid them half a pixel off. Now rasterio's centre of pixel (0, 0), and each
    coarser level's as ome-zarr's writer places it; a 2D OME-Zarr input's translation is read as that centre too
    (its grid's corner half a pixel before)."""
    from rasterio.transform import Affine

    from tilemask.sources import open_source

    image = (np.random.default_rng(4).random((3, 600, 700)) * 255).astype(np.uint8)
    path = tmp_path / "south_up.tif"
    with rasterio.open(path, "w", driver="GTiff", height=600, width=700, count=3, dtype="uint8", crs="EPSG:32618",
                       transform=Affine(30.0, 0.0, 500000.0, 0.0, 30.0, 3990000.0)) as ds:  # fmt: skip
        ds.write(image)
        x, y = ds.xy(0, 0)  # the centre of pixel (0, 0), rasterio's
    weights, _ = make_model(UNET_2D)
    wf = raster_workflow(path, weights, output={"path": "out/{stem}.ome.zarr", "chunks": 256})
    (result,) = tilemask.run(Workflow.from_dict(wf, base_dir=tmp_path), client)
    root = zarr.open_group(result.outputs[0], mode="r")
    multiscale = labels_multiscale(root)
    levels = [d["coordinateTransformations"] for d in multiscale["datasets"]]
    assert levels[0] == [{"type": "scale", "scale": [30.0, 30.0]}, {"type": "translation", "translation": [y, x]}]
    shapes = [np.asarray(root[f"labels/labels/{d['path']}"]).shape for d in multiscale["datasets"]]
    assert shapes == [(600, 700), (300, 350), (150, 175)]  # exact halves: ome-zarr's factors are their ratios
    for level, (scale, translation) in enumerate(FormatV05().generate_coordinate_transformations(shapes)):
        np.testing.assert_allclose(levels[level][0]["scale"], np.multiply(scale["scale"], 30.0))
        np.testing.assert_allclose(levels[level][1]["translation"],
                                   np.add([y, x], np.multiply(translation["translation"], 30.0)))  # fmt: skip
    # as an input (level 0 of that multiscale): the translation is pixel (0, 0)'s centre in the grid read from it
    read = zarr.open_group(tmp_path / "read.ome.zarr", mode="w", zarr_format=3)
    read.create_array("0", data=np.asarray(root["labels/labels/0"]), chunks=(256, 256), dimension_names=("y", "x"))
    read.attrs["ome"] = {"version": "0.5", "multiscales": [{**multiscale, "datasets": multiscale["datasets"][:1]}]}
    Image.from_zarr(zarr.open_group(tmp_path / "read.ome.zarr", mode="r"))
    source = open_source(str(tmp_path / "read.ome.zarr"), spatial_dims=2)
    centre = rasterio.transform.xy(Affine.from_gdal(*source.geometry.transform), 0, 0)
    np.testing.assert_allclose(centre, (x, y))


def test_volume_axes_are_named_after_the_world_axes_they_run_along(make_volume, make_model, tmp_path, client):
    """A NIfTI volume's array axes keep their order; each is named x, y or z after the world axis of its affine
    that nibabel orients it to (the fixture's first axis runs along y, its second along -x)."""
    path, volume = make_volume((24, 20, 16))
    weights, _ = make_model(UNET_3D)
    root = zarr.open_group(run_small_volume(path, weights, tmp_path, client, ".ome.zarr"), mode="r")
    world = {"L": "x", "R": "x", "P": "y", "A": "y", "I": "z", "S": "z"}
    expected = [world[code] for code in nib.aff2axcodes(nib.load(path).affine)]
    assert expected == ["y", "x", "z"]
    for node in (root, root["labels/labels"]):
        (multiscale,) = dict(node.attrs)["ome"]["multiscales"]
        assert [a["name"] for a in multiscale["axes"]] == expected
        assert list(node["0"].metadata.dimension_names) == expected
        # the second axis runs along -x: NGFF's positive scales cannot place it, so no translation claims to
        assert [t["type"] for t in multiscale["datasets"][0]["coordinateTransformations"]] == ["scale"]
    assert np.asarray(root["labels/labels/0"]).shape == volume.shape


def test_an_ome_zarr_named_zarr_is_read_as_one_and_an_array_inside_a_group_by_its_path(make_model, tmp_path):
    """NGFF 0.4 stores are often plain ``.zarr``: one was "a Zarr group; give the path of the array inside it",
    and that path then read as a GDAL raster (2 spatial axes for a 3D model)."""
    from tilemask.errors import InputError, WorkflowError
    from tilemask.sources import open_source

    volume = np.arange(20 * 18 * 16, dtype=np.int16).reshape(20, 18, 16)
    named = tmp_path / "v04.zarr"
    group = zarr.open_group(named, mode="w", zarr_format=2)
    group.create_array("0", data=volume, chunks=(10, 9, 8))
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 1.0, 0.5]}]}],
    }]  # fmt: skip
    source = open_source(str(named), 3)
    affine = np.asarray(source.geometry.affine)
    assert (affine[2, 0], affine[1, 1], affine[0, 2]) == (2.0, 1.0, 0.5)  # array axis z on world z, ...: its scale
    inside = open_source(str(named / "0"), 3)
    assert inside.shape == (1, 20, 18, 16)
    np.testing.assert_array_equal(inside.read(((0, 20), (0, 18), (0, 16)))[0], volume)
    assert inside.geometry == source.geometry  # a level's scale is its parent's metadata: it was 1 mm voxels
    group.create_array("1", data=volume[::2, ::2, ::2], chunks=(10, 9, 8))
    group.attrs["multiscales"] = [{**group.attrs["multiscales"][0], "datasets": [
        *group.attrs["multiscales"][0]["datasets"],
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 2.0, 1.0]}]}]}]  # fmt: skip
    coarse = np.asarray(open_source(str(named / "1"), 3).geometry.affine)
    assert (coarse[2, 0], coarse[1, 1], coarse[0, 2]) == (4.0, 2.0, 1.0)
    nested = group.create_group("A/1")  # an image's group inside a store (an HCS field): its first level, on its
    nested.create_array("0", data=volume, chunks=(10, 9, 8))  # scale (it was refused as a GDAL raster of no band)
    nested.attrs["multiscales"] = group.attrs["multiscales"]
    field = open_source(str(named / "A" / "1"), 3)
    assert field.geometry == source.geometry and field.shape == (1, 20, 18, 16)

    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w", zarr_format=3).create_array("scan", data=volume, chunks=(10, 9, 8))
    with pytest.raises(InputError, match=rf"^{plain}: a Zarr group without OME-Zarr multiscales; give the path of the "
                                         rf"image array inside it, {plain}/NAME \(it holds scan\)$"):  # fmt: skip
        open_source(str(plain), 3)
    np.testing.assert_array_equal(open_source(str(plain / "scan"), 3).read(((0, 20), (0, 18), (0, 16)))[0], volume)

    # a raster GDAL wrote into a Zarr store keeps the CRS and transform GDAL reads (zarr-python knows neither)
    with rasterio.open(tmp_path / "scene.zarr", "w", driver="Zarr", width=64, height=48, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.transform.from_origin(5e5, 4e6, 10, 10)) as ds:  # fmt: skip
        ds.write(np.arange(48 * 64, dtype=np.uint8).reshape(1, 48, 64))
    scene = open_source(str(tmp_path / "scene.zarr" / "scene"), 2)
    assert rasterio.CRS.from_wkt(scene.geometry.crs_wkt).to_epsg() == 32633
    assert scene.geometry.transform == (5e5, 10.0, 0.0, 4e6, 0.0, -10.0)
    # an array inside a store is an input, never an output path
    weights, _ = make_model(UNET_2D)
    for inside in ("out.zarr/{stem}", "scan.ome.zarr/{stem}_seg"):
        with pytest.raises(WorkflowError, match="suffix must be one of"):
            Workflow.from_dict(raster_workflow(str(named), weights, output={"path": inside}), base_dir=tmp_path)


def mode_of_cells_nd(labels: np.ndarray) -> np.ndarray:
    """:func:`mode_of_cells` of a volume: each 2 x 2 x 2 cell's most frequent real value, ties the smallest."""
    from collections import Counter

    out = np.zeros(tuple((s + 1) // 2 for s in labels.shape), labels.dtype)
    for index in np.ndindex(out.shape):
        counts = Counter(labels[tuple(slice(2 * i, 2 * i + 2) for i in index)].ravel().tolist())
        out[index] = min(counts, key=lambda v: (-counts[v], v))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("classes", [3, 118])
def test_a_levels_mode_holds_a_few_times_its_block_whatever_the_number_of_classes(classes):
    """Each coarser level's labels counted every class present in the block at once: 8 MB of labels (256 x 256 x
    128) of 118 classes (a whole-body CT model's) held 2 GB and took 15 s, a 512 x 512 x 300 CT, one chunk at the
    default chunks, about 19 GB on the worker that finishes the run."""
    import tracemalloc

    from tilemask.sinks.omezarr import mode_downsample

    rng = np.random.default_rng(classes)
    blocks = rng.integers(0, classes, (17, 16, 13)).astype(np.uint8)
    labels = np.repeat(np.repeat(np.repeat(blocks, 4, 0), 4, 1), 4, 2)[:65, :63, :49]  # odd: edge cells
    labels = np.where(rng.random(labels.shape) < 0.3, rng.integers(0, classes, labels.shape), labels).astype(np.uint8)
    tracemalloc.start()
    try:
        level = mode_downsample(labels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(level, mode_of_cells_nd(labels))
    assert level.dtype == labels.dtype
    assert peak < 16 * labels.nbytes, f"{peak / labels.nbytes:.0f} times the block"


@pytest.mark.timeout(120)
def test_a_thin_volumes_levels_reach_the_smallest_size_halving_only_its_axes_of_more_than_one_voxel(tmp_path, client):
    """Levels stopped at the first whose shortest axis was one voxel: a slab of two 3 mm slices of 600 x 520 voxels
    had one coarser level, 300 x 260 x 1, over the 256 the levels go down to (a single slice: none at all)."""
    data = (np.random.default_rng(3).random((600, 520, 2)) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 3.0, 1.0])), tmp_path / "slab.nii.gz")
    import torch

    args = {"in_channels": 1, "out_channels": 3, "kernel_size": 1}
    torch.manual_seed(0)
    torch.save(torch.nn.Conv3d(**args).state_dict(), tmp_path / "weights.pt")
    workflow = {
        "version": 1, "input": str(tmp_path / "slab.nii.gz"),
        "model": {"network": "torch.nn:Conv3d", "args": args, "weights": str(tmp_path / "weights.pt")},
        "preprocess": {"normalize": {"mean": [500.0], "std": [300.0]}},
        "inference": {"roi_size": [256, 256, 2], "device": "cpu"},
        "output": {"path": "out/{stem}.ome.zarr", "chunks": 256, "probabilities": "float32"},
    }  # fmt: skip
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    root = zarr.open_group(result.outputs[0], mode="r")
    Image.from_zarr(root)
    multiscale = labels_multiscale(root)
    levels = [np.asarray(root["labels/labels"][d["path"]]) for d in multiscale["datasets"]]
    assert [level.shape for level in levels] == [(600, 520, 2), (300, 260, 1), (150, 130, 1)]
    assert [root[str(n)].shape for n in range(3)] == [(3, 600, 520, 2), (3, 300, 260, 1), (3, 150, 130, 1)]
    transforms = [d["coordinateTransformations"] for d in multiscale["datasets"]]
    assert [t[0]["scale"] for t in transforms] == [[0.5, 0.5, 3.0], [1.0, 1.0, 6.0], [2.0, 2.0, 6.0]]
    # the centre of each level's first cell: 2 x 2 x 2 level-0 voxels, then 4 x 4 x 2
    assert [t[1]["translation"] for t in transforms] == [[0.0, 0.0, 0.0], [0.25, 0.25, 1.5], [0.75, 0.75, 1.5]]
    np.testing.assert_array_equal(levels[1], mode_of_cells_nd(levels[0]))
    np.testing.assert_array_equal(levels[2][..., 0], mode_of_cells(levels[1][..., 0]))
    probabilities = [np.asarray(root[str(n)]) for n in range(3)]
    np.testing.assert_allclose(probabilities[2][..., 0], probabilities[1][..., 0].reshape(3, 150, 2, 130, 2).mean(
        axis=(2, 4)), rtol=1e-6)  # fmt: skip


@pytest.mark.timeout(30)
def test_an_ome_zarr_volume_with_a_scale_of_0_is_refused_for_its_affine(tmp_path):
    """A scale of 0 puts every voxel of an axis at one place: a singular affine, refused when the input is opened."""
    from tilemask.errors import InputError
    from tilemask.sources import open_source

    path = tmp_path / "flat.ome.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=2)
    group.create_array("0", data=np.zeros((8, 8, 8), np.int16), chunks=(8, 8, 8))
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.0, 1.0, 1.0]}]}],
    }]  # fmt: skip
    with pytest.raises(InputError, match=rf"^{path}: its affine \(voxel-to-world matrix\) is not usable: it is "
                                         r"singular .*scale") as refused:  # fmt: skip
        open_source(str(path), 3)
    assert refused.value.exit_status == 2


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_run_cut_short_leaves_no_group_an_ome_zarr_reader_takes_for_an_image(tmp_path, client, ndim):
    """The multiscales and image-label were written when the output was created: a run killed before it finished
    (SIGKILL, a lost node) left a hidden group that ome-zarr-models validated and ome-zarr's reader (napari's)
    opened as labels, background where no chunk had come. They are written once every level holds its data."""
    from tests.test_formats import regions, started, write

    path, _, layout, sink, labels, probabilities = started(tmp_path, ".ome.zarr", ndim)
    write(sink, labels, probabilities, regions(layout)[:2], client)  # two chunks, then the run dies
    (staged,) = tmp_path.iterdir()
    with pytest.raises(ValueError, match="ome"):
        Image.from_zarr(zarr.open_group(staged, mode="r"))
    assert [spec for node in Reader(parse_url(str(staged)))() for spec in node.specs] == []

    write(sink, labels, probabilities, regions(layout)[2:], client)
    sink.commit()
    root = zarr.open_group(path, mode="r")
    Image.from_zarr(root)
    ImageLabel.from_zarr(root["labels/labels"])
    (label,) = [n for n in Reader(parse_url(path))() if any(isinstance(s, Label) for s in n.specs)]
    np.testing.assert_array_equal(np.asarray(label.data[0]), labels)


def test_a_raster_in_feet_keeps_its_crs_units_in_ome_zarr():
    """Post-processing converts a raster's feet to metres (sizes in m2); its OME-Zarr scale and translation stay
    in the CRS's own unit, with none named, as before that conversion and as the grid in tilemask's attributes (a
    review: metres named, the translation still in feet)."""
    from types import SimpleNamespace

    from pyproj import CRS

    from tilemask.geometry import RasterGeometry
    from tilemask.sinks.omezarr import space_axes

    transform = (1e6, 10.0, 0.0, 2e5, 0.0, 10.0)  # rows run north: a translation is written
    for epsg, unit in ((2263, None), (32618, "meter")):
        layout = SimpleNamespace(geometry=RasterGeometry(CRS.from_epsg(epsg).to_wkt(), transform), shape=(20, 30),
                                 reference="scene.tif")  # fmt: skip
        _, scale, translation, named = space_axes(layout)
        assert (scale, translation, named) == ([10.0, 10.0], [2e5 + 5, 1e6 + 5], unit), epsg


@pytest.mark.timeout(120)
def test_an_ome_zarr_of_one_time_point_is_read_as_its_volume(make_volume, make_model, tmp_path, client):
    """bioformats2raw writes every image with axes t, c, z, y, x: one of a single time point was refused ("OME-Zarr
    axes ['time', 'channel', 'space', 'space', 'space']: tilemask reads channel and space axes only"). It is that
    point's volume: the labels of the z, y, x volume alone; several time points are refused, named."""
    from tilemask.errors import InputError
    from tilemask.sources import open_source

    _, volume = make_volume((20, 18, 16))
    weights, _ = make_model(UNET_3D)
    scale = [2.5, 1.2, 0.9]
    labels = []
    for name, data, axes in [("zyx", volume, "zyx"), ("tczyx", volume[None, None], "tczyx")]:
        source = tmp_path / f"{name}.ome.zarr"
        group = zarr.open_group(source, mode="w", zarr_format=3)
        group.create_array("0", data=data, chunks=data.shape, dimension_names=tuple(axes))
        kinds = {"t": "time", "c": "channel"}
        group.attrs["ome"] = {"version": "0.5", "multiscales": [{
            "axes": [{"name": n, "type": kinds.get(n, "space"), **({} if n in kinds else {"unit": "millimeter"})}
                     for n in axes],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                                      "scale": [1.0] * (len(axes) - 3) + scale}]}],
        }]}  # fmt: skip
        Image.from_zarr(zarr.open_group(source, mode="r"))
        (tmp_path / "out").mkdir(exist_ok=True)
        out = run_small_volume(source, weights, tmp_path, client, ".nii.gz")
        image = nib.load(out)
        labels.append((np.asarray(image.dataobj), image.affine))
        (tmp_path / "out").rename(tmp_path / f"out_{name}")
    assert labels[1][0].shape == volume.shape
    np.testing.assert_array_equal(labels[1][0], labels[0][0])
    np.testing.assert_array_equal(labels[1][1], labels[0][1])
    two = zarr.open_group(tmp_path / "two.ome.zarr", mode="w", zarr_format=3)
    two.create_array("0", data=np.stack([volume, volume])[:, None], chunks=(1, 1, 20, 18, 16))
    two.attrs["ome"] = {**dict(group.attrs)["ome"]}
    with pytest.raises(InputError, match=r"OME-Zarr of 2 time points \(axes \['time', 'channel', 'space', 'space', "
                                         r"'space'\]\); tilemask reads one image"):  # fmt: skip
        open_source(str(tmp_path / "two.ome.zarr"), 3)


def test_an_ome_zarr_without_a_label_image_is_named_as_the_user_named_it(tmp_path):
    """It was named as zarr's store prints itself, ``file:///...``."""
    from tilemask.errors import InputError
    from tilemask.sources.labels import open_labels

    path = tmp_path / "image.ome.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("0", data=np.zeros((4, 5, 6), np.uint8))
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
    }]}  # fmt: skip
    with pytest.raises(InputError, match=rf"^{path}: an OME-Zarr without a label image"):
        open_labels(str(path))
    server = serve(str(tmp_path))  # over HTTP: "<FsspecStore(HTTPFileSystem, http://...)>: an OME-Zarr without ..."
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/image.ome.zarr"
        with pytest.raises(InputError, match=rf"^{re.escape(url)}: an OME-Zarr without a label image"):
            open_labels(url)
    finally:
        server.shutdown()
