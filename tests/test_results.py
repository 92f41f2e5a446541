"""open_result: COG and Zarr outputs of the same labels open as the same lazy, georeferenced DataArray."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import replace
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray
import xarray as xr
import zarr
from rasterio.transform import Affine

from tilemask.errors import InputError, UsageError
from tilemask.formats import zarr_store_of
from tilemask.geometry import RasterGeometry
from tilemask.outputs import new_run_id
from tilemask.results import open_result
from tilemask.sinks import OutputLayout, make_sink
from tilemask.sources import open_source

from .range_server import serve

CLASSES = ("background", "water", "land")


def drive(sink, labels, probabilities):
    sink.create()
    (h, w), (ch, cw) = sink.layout.shape, sink.layout.chunks
    for r in range(0, h, ch):
        for c in range(0, w, cw):
            sink.write(((r, min(r + ch, h)), (c, min(c + cw, w))), labels[r : r + ch, c : c + cw],
                       None if probabilities is None else probabilities[:, r : r + ch, c : c + cw])  # fmt: skip
    return sink.commit()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The same labels and uint8 probabilities written as a COG and as Zarr, in EPSG:4326."""
    tmp = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=(600, 700)).astype(np.uint8)
    labels[:20] = 255
    probabilities = rng.integers(0, 256, size=(3, 600, 700)).astype(np.uint8)
    transform = Affine(0.0002, 0, 6.5, 0, -0.0002, 45.2)
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(4326).to_wkt(), tuple(transform.to_gdal()))
    layout = OutputLayout(labels.shape, (256, 256), CLASSES, "uint8", 3, "uint8", geometry, "input.tif", 255)
    paths = {}
    for suffix in (".tif", ".zarr"):
        paths[suffix] = str(tmp / f"mask{suffix}")
        drive(make_sink(paths[suffix], layout), labels, probabilities)
    return paths, labels, probabilities, transform


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_uint8_probabilities_say_their_scale_and_a_sigmoids_band_names_its_class(tmp_path, suffix):
    """uint8 probabilities are ``round(p * 255)``: their array said nothing of it (``p > 0.5`` held wherever p was
    1/255 or more), where rioxarray gives a COG's band scale as ``scale_factor``; and a sigmoid's one band, the
    foreground's probability, was named by both classes."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, size=(300, 200)).astype(np.uint8)
    probabilities = rng.integers(0, 256, size=(1, 300, 200)).astype(np.uint8)
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 10.0, 0.0, 4e6, 0.0, -10.0))
    layout = OutputLayout(labels.shape, (128, 128), ("land", "water"), "uint8", 1, "uint8", geometry, "in.tif", 255)
    path = str(tmp_path / f"mask{suffix}")
    drive(make_sink(path, layout), labels, probabilities)
    array = open_result(path, "probabilities")
    assert array.attrs["class_names"] == ["water"]
    assert (array.attrs["scale_factor"], array.attrs["add_offset"]) == (1 / 255, 0.0)
    decoded = xr.decode_cf(array.to_dataset(name="p"))["p"]
    np.testing.assert_allclose(decoded.values, probabilities / 255, rtol=1e-6)
    assert "scale_factor" not in open_result(path).attrs  # the labels are as stored


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_labels_are_lazy_and_georeferenced(outputs, suffix):
    paths, labels, _, transform = outputs
    array = open_result(paths[suffix])
    assert isinstance(array, xr.DataArray) and isinstance(array.data, da.Array)
    assert array.dims == ("y", "x") and array.name == "labels"
    assert array.rio.crs.to_epsg() == 4326
    assert array.rio.transform() == transform
    assert array.rio.nodata == 255
    assert array.attrs["class_names"] == list(CLASSES)
    assert np.array_equal(array.values, labels)


def test_cog_and_zarr_open_alike(outputs):
    paths, *_ = outputs
    cog, zarr_ = open_result(paths[".tif"]), open_result(paths[".zarr"])
    xr.testing.assert_identical(cog.drop_vars("spatial_ref"), zarr_.drop_vars("spatial_ref"))
    native = rioxarray.open_rasterio(paths[".tif"]).squeeze("band", drop=True)
    np.testing.assert_array_equal(cog.x.values, native.x.values)
    np.testing.assert_array_equal(cog.y.values, native.y.values)


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_probabilities(outputs, suffix):
    paths, _, probabilities, transform = outputs
    array = open_result(paths[suffix], "probabilities")
    assert array.dims == ("class", "y", "x") and isinstance(array.data, da.Array)
    assert array.rio.crs.to_epsg() == 4326 and array.rio.transform() == transform
    assert array.attrs["class_names"] == list(CLASSES)
    assert np.array_equal(array.values, probabilities)


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_a_path_and_chunks_per_axis_open_a_cog_as_they_open_zarr(outputs, suffix):
    """A reviewer's: ``open_result(Path(cog))`` was a TypeError (``Path(zarr)`` opened), its probabilities an
    AttributeError, and a COG's probabilities with ``chunks=(y, x)`` a dask ValueError. A variable that is none
    is a UsageError, a ValueError too, as a wrong number of chunks is."""
    paths, labels, probabilities, _ = outputs
    np.testing.assert_array_equal(open_result(Path(paths[suffix])).values, labels)
    opened = open_result(Path(paths[suffix]), "probabilities", chunks=(100, 300))
    assert opened.data.chunks == ((3,), (100,) * 6, (300, 300, 100))
    np.testing.assert_array_equal(opened.values, probabilities)
    with pytest.raises(UsageError, match=r"^variable must be 'labels' or 'probabilities', not 'probs'$"):
        open_result(paths[suffix], "probs")
    with pytest.raises(ValueError, match=r"^chunks has 3 values but the image has 2 spatial axes$"):
        open_result(paths[suffix], "probabilities", chunks=(8, 8, 8))


def test_missing_probabilities(tmp_path):
    path = tmp_path / "m.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=Affine(1, 0, 0, 0, -1, 0)) as dst:  # fmt: skip
        dst.write(np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(InputError, match="no probabilities"):
        open_result(str(path), "probabilities")
    assert open_result(str(path)).shape == (4, 4)
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'gone.tif'))}: does not exist$"):  # not "no probabilities"
        open_result(str(tmp_path / "gone.tif"), "probabilities")
    with pytest.raises(InputError, match=r"^s3://b/x\.nii\.gz: a NIfTI's probabilities are read from a local file"):
        open_result("s3://b/x.nii.gz", "probabilities")  # a review's: it said they were missing (./s3:/b/...)


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_a_rotated_grid_has_rioxarrays_2d_coordinates(tmp_path, suffix):
    """A rotated geotransform gives 2D pixel-centre coordinates, named ``xc``/``yc`` as rioxarray.open_rasterio
    names them: named ``x``/``y`` after the dimensions, rioxarray took them for 1D axes (``rio.bounds()`` and
    ``rio.reproject`` raised 'only 0-dimensional arrays can be converted to Python scalars')."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=(40, 50)).astype(np.uint8)
    probabilities = rng.integers(0, 256, size=(3, 40, 50)).astype(np.uint8)
    transform = Affine.translation(500000, 4000000) @ Affine.rotation(20) @ Affine.scale(30, -30)
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), tuple(transform.to_gdal()))
    layout = OutputLayout(labels.shape, (32, 32), CLASSES, "uint8", 3, "uint8", geometry, "input.tif", 255)
    paths = {s: str(tmp_path / f"mask{s}") for s in {".tif", suffix}}
    for each in paths.values():
        drive(make_sink(each, layout), labels, probabilities)
    native = rioxarray.open_rasterio(paths[".tif"])
    for array in (open_result(paths[suffix]), open_result(paths[suffix], "probabilities")):
        assert set(array.coords) == {"xc", "yc", "spatial_ref"} and array.dims[-2:] == ("y", "x")
        assert array.rio.transform() == transform
        np.testing.assert_array_equal(array.xc.values, native.xc.values)
        np.testing.assert_array_equal(array.yc.values, native.yc.values)
        array.rio.bounds()
        assert array.rio.reproject("EPSG:32618").rio.crs.to_epsg() == 32618


@pytest.mark.parametrize("suffix", [".nii.gz", ".zarr", ".ome.zarr"])
def test_a_volumes_nodata_label_is_its_fill_value_and_odd_arguments_are_named(tmp_path, suffix):
    """Volume labels opened with no word of their nodata label (a raster's is ``_FillValue``): 255, where the scan
    was NaN, read as a class. ``chunks=0`` was a ZeroDivisionError, ``chunks=2.5`` blamed on the file; a folder
    inside a Zarr (which GDAL opens with no band) an IndexError."""
    from tilemask.geometry import VolumeGeometry

    labels = np.random.default_rng(2).integers(0, 3, size=(20, 18, 12)).astype(np.uint8)
    labels[3, 4, 5] = 255
    affine = tuple(tuple(r) for r in np.diag([0.8, 0.8, 2.5, 1.0]).tolist())
    layout = OutputLayout(labels.shape, (16, 16, 16), CLASSES, "uint8", 0, "none", VolumeGeometry(affine),
                          str(tmp_path / "scan.nii.gz"), 255)  # fmt: skip
    path = str(tmp_path / f"labels{suffix}")
    sink = make_sink(path, layout)
    sink.create()
    sink.write(((0, 16), (0, 16), (0, 12)), labels[:16, :16], None)
    sink.write(((16, 20), (0, 16), (0, 12)), labels[16:, :16], None)
    sink.write(((0, 16), (16, 18), (0, 12)), labels[:16, 16:], None)
    sink.write(((16, 20), (16, 18), (0, 12)), labels[16:, 16:], None)
    sink.commit()
    opened = open_result(path)
    np.testing.assert_array_equal(opened.values, labels)
    assert opened.attrs["_FillValue"] == 255 and opened.rio.nodata == 255  # as rioxarray reads a raster's
    for chunks in (0, 2.5, "8", (8, 0, 8), ()):
        with pytest.raises(InputError, match=f"^chunks must be a positive integer or one per axis, got "
                                             f"{re.escape(repr(chunks))}$"):  # fmt: skip
            open_result(path, chunks=chunks)
    assert open_result(path, chunks=(8, 6, 4)).data.chunks == ((8, 8, 4), (6, 6, 6), (4, 4, 4))  # one per axis
    if suffix == ".ome.zarr":  # its labels/ group, which lists its label images
        with pytest.raises(InputError, match=r"/labels: an OME-Zarr labels group, which lists label images; give one "
                                             r"\(\S+/labels\.ome\.zarr/labels/labels\)$"):  # fmt: skip
            open_result(f"{path}/labels")


def test_labels_given_by_their_path_inside_a_zarr_store_open_on_the_stores_grid(tmp_path):
    """An array or label image inside a Zarr store (``seg.ome.zarr/labels/labels/0``, ``seg.zarr/labels``, a level
    of another OME-Zarr's label image) was handed to GDAL: "Unsupported codec: bytes", or a group "with 0 bands".
    A tilemask output's labels open as the output does; another OME-Zarr level on that level's scale, as its
    multiscale's metadata gives it (ome-zarr's reader reads the same scale)."""
    from distributed import Client, LocalCluster
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from tilemask.geometry import VolumeGeometry
    from tilemask.stats.api import compute_stats

    labels = np.random.default_rng(4).integers(0, 3, size=(20, 18, 12)).astype(np.uint8)
    affine = tuple(tuple(r) for r in np.diag([0.8, 0.8, 2.5, 1.0]).tolist())
    for suffix, inside in ((".zarr", ["labels"]), (".ome.zarr", ["labels/labels/0", "labels/labels"])):
        layout = OutputLayout(labels.shape, (16, 16, 16), CLASSES, "uint8", 0, "none", VolumeGeometry(affine),
                              str(tmp_path / "scan.nii.gz"), 255)  # fmt: skip
        store = tmp_path / f"seg{suffix}"
        sink = make_sink(str(store), layout)
        sink.create()
        sink.write(((0, 20), (0, 18), (0, 12)), labels, None)
        sink.commit()
        whole = open_result(store)
        for key in inside:
            opened = open_result(store / key)
            xr.testing.assert_identical(opened, whole)
    # an OME-Zarr label image of two levels, not tilemask's
    root = zarr.open_group(tmp_path / "atlas.ome.zarr", mode="w", zarr_format=3)
    image = root.create_group("labels/regions")
    image.create_array("0", data=labels, chunks=(10, 9, 6), dimension_names=("z", "y", "x"))
    image.create_array("1", data=labels[::2, ::2, ::2], chunks=(10, 9, 6), dimension_names=("z", "y", "x"))
    image.attrs["ome"] = {"version": "0.5", "image-label": {}, "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"],
        "datasets": [{"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
                     for level, scale in enumerate(([2.5, 0.8, 0.8], [5.0, 1.6, 1.6]))]}]}  # fmt: skip
    root["labels"].attrs["ome"] = {"version": "0.5", "labels": ["regions"]}
    root.attrs["ome"] = {"version": "0.5"}
    (node,) = [n for n in Reader(parse_url(str(tmp_path / "atlas.ome.zarr" / "labels" / "regions")))()
               if n.metadata.get("coordinateTransformations")]  # fmt: skip
    reference = node.metadata["coordinateTransformations"][1][0]["scale"]  # ome-zarr's reading of level 1
    coarse = open_result(tmp_path / "atlas.ome.zarr" / "labels" / "regions" / "1")
    np.testing.assert_array_equal(coarse.values, labels[::2, ::2, ::2])
    placed = np.asarray(coarse.attrs["affine"])
    np.testing.assert_allclose((placed[2, 0], placed[1, 1], placed[0, 2]), reference)  # array axis z on world z
    cells = zarr.open_group(tmp_path / "cells.ome.zarr", mode="w", zarr_format=3)  # labels with a channel axis
    cells.create_array("0", data=labels[:1], chunks=(1, 9, 6))
    cells.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "c", "type": "channel"}, *(
        {"name": n, "type": "space"} for n in "yx")], "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 0.5, 0.5]}]}]}]}  # fmt: skip
    with pytest.raises(InputError, match=r"/cells\.ome\.zarr/0: a label image has space axes only, or a time axis of "
                                         r"one point before them; this OME-Zarr's "
                                         r"are c, y, x$"):  # fmt: skip (it was "OME-Zarr with 2 space axes for a
        open_result(tmp_path / "cells.ome.zarr" / "0")  # 3D model", naming no file)
    for axes in (["z", "y", "x"], [{"name": n} for n in "zyx"]):  # NGFF 0.3 names axes only; 0.4 may leave out types
        old = zarr.open_group(tmp_path / "old.ome.zarr", mode="w", zarr_format=2)
        old.create_array("0", data=labels, chunks=(10, 9, 6))
        old.attrs["multiscales"] = [{"version": "0.3", "axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.5, 0.8, 0.8]}]}]}]  # fmt: skip
        placed = np.asarray(open_result(tmp_path / "old.ome.zarr" / "0").attrs["affine"])
        np.testing.assert_allclose((placed[2, 0], placed[1, 1], placed[0, 2]), [2.5, 0.8, 0.8])
    scores = OutputLayout((40, 50), (32, 32), CLASSES, "uint8", 3, "uint8", RasterGeometry(None, (0, 1, 0, 0, 0, -1)),
                          str(tmp_path / "scene.tif"))  # fmt: skip (uint8 probabilities: integers, 3 axes)
    drive(make_sink(str(tmp_path / "scores.zarr"), scores), np.zeros((40, 50), np.uint8),
          np.zeros((3, 40, 50), np.uint8))  # fmt: skip
    with pytest.raises(InputError, match=r"scores\.zarr/probabilities: not the labels of the tilemask output \S+"
                                         r"scores\.zarr \(they are \S+scores\.zarr/labels\); give "):  # fmt: skip
        open_result(tmp_path / "scores.zarr" / "probabilities")  # they were read as labels of a volume
    assert zarr_store_of(f"{tmp_path}/seg.zarr//labels") == (f"{tmp_path}/seg.zarr", "labels")
    with pytest.raises(ValueError, match="inside no Zarr store"):
        zarr_store_of(f"{tmp_path}/labels/0")
    server = serve(str(tmp_path))  # the same level on a web server: it went to GDAL ("Unsupported codec")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = open_result(f"http://127.0.0.1:{server.server_address[1]}/atlas.ome.zarr/labels/regions/1")
        xr.testing.assert_identical(remote, coarse)
    finally:
        server.shutdown()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:  # a port of its own, not 8787, and the cluster closed with it
        table = pd.read_csv(compute_stats(tmp_path / "atlas.ome.zarr/labels/regions/1", tmp_path / "coarse.csv",
                                          client=client))  # fmt: skip
        values, counts = np.unique(labels[::2, ::2, ::2], return_counts=True)
        np.testing.assert_array_equal(table["voxels"], counts)
        np.testing.assert_allclose(table["volume_ml"], counts * np.prod(reference) / 1000)
        # a label image inside a store as the regions (an atlas): it was taken for a vector file GDAL did not open
        atlas = pd.read_csv(compute_stats(tmp_path / "atlas.ome.zarr/labels/regions/0", tmp_path / "atlas.csv",
                                          regions=tmp_path / "atlas.ome.zarr/labels/regions", client=client))  # fmt: skip
        whole = np.unique(labels, return_counts=True)[1]
        np.testing.assert_array_equal(atlas["region"], [1, 2])  # an atlas's 0 is outside every region
        assert [c for c in atlas.columns if c.endswith("_voxels")] == ["class_1_voxels", "class_2_voxels"], atlas
        np.testing.assert_array_equal(atlas[["class_1_voxels", "class_2_voxels"]].to_numpy(), np.diag(whole[1:]))
        # a 2D label array in a store, per polygon: as the same labels in a GeoTIFF (exactextract's reading)
        scene = np.random.default_rng(5).integers(0, 3, (300, 400)).astype(np.uint8)
        transform = Affine(10.0, 0.0, 5e5, 0.0, -10.0, 4e6)
        array = zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3).create_array("mask", data=scene,
                                                                                               chunks=(128, 128))
        array.attrs.update(crs=rasterio.CRS.from_epsg(32633).to_wkt(), transform=list(transform.to_gdal()))
        with rasterio.open(tmp_path / "mask.tif", "w", driver="GTiff", width=400, height=300, count=1, dtype="uint8",
                           crs="EPSG:32633", transform=transform) as ds:  # fmt: skip
            ds.write(scene, 1)
        regions = tmp_path / "regions.geojson"
        regions.write_text(json.dumps({"type": "FeatureCollection", "features": [{
            "type": "Feature", "properties": {"id": 1}, "geometry": {"type": "Polygon", "coordinates": [[
                [500105, 3999905], [503000, 3999905], [503000, 3998003], [500105, 3998003], [500105, 3999905]]]}}],
            "crs": {"type": "name", "properties": {"name": "EPSG:32633"}}}))  # fmt: skip
        for coverage in ("center", "fraction"):
            pd.testing.assert_frame_equal(
                pd.read_csv(compute_stats(tmp_path / "plain.zarr/mask", tmp_path / "z.csv", regions=regions,
                                          coverage=coverage, client=client)),
                pd.read_csv(compute_stats(tmp_path / "mask.tif", tmp_path / "t.csv", regions=regions,
                                          coverage=coverage, client=client)))  # fmt: skip
        for key in ("labels", "labels/labels/0"):  # a tilemask output's table, as of the output itself
            store = tmp_path / ("seg.zarr" if key == "labels" else "seg.ome.zarr")
            pd.testing.assert_frame_equal(
                pd.read_csv(compute_stats(store / key, tmp_path / "inside.csv", client=client)),
                pd.read_csv(compute_stats(store, tmp_path / "whole.csv", client=client)))


def test_a_coarser_level_of_an_outputs_labels_keeps_its_classes_nodata_and_place(tmp_path):
    """A review's: ``seg.ome.zarr/labels/labels/1`` was read as a foreign array: its nodata label counted as a
    class, its class names lost, and its grid NGFF's (no flip, no CRS: the volume 100 mm away, a raster's areas
    in pixels). Each pixel of level 1 is where the 2 x 2 (x 2) pixels of level 0 it sums up are, on average."""
    import rasterio.transform

    from tilemask.geometry import VolumeGeometry

    rng = np.random.default_rng(6)
    volume = rng.integers(0, 3, size=(300, 40, 30)).astype(np.uint8)
    volume[:40, :8] = 255
    raster = rng.integers(0, 3, size=(520, 90)).astype(np.uint8)
    raster[:30] = 255
    crs = rasterio.CRS.from_epsg(32633).to_wkt()
    transform = (5e5, 10.0, 0.0, 4e6, 0.0, -10.0)
    for name, labels, geometry in (("vol", volume, VolumeGeometry(((-0.8, 0.0, 0.0, 100.0), (0.0, 1.2, 0.0, -50.0),
                                                                   (0.0, 0.0, 2.5, 30.0), (0.0, 0.0, 0.0, 1.0)))),
                                   ("ras", raster, RasterGeometry(crs, transform))):  # fmt: skip
        layout = OutputLayout(labels.shape, (64,) * labels.ndim, CLASSES, "uint8", 0, "none", geometry,
                              str(tmp_path / "scan.nii.gz"), 255)  # fmt: skip
        sink = make_sink(str(tmp_path / f"{name}.ome.zarr"), layout)
        sink.create()
        for start in range(0, labels.shape[0], 64):
            region = ((start, min(start + 64, labels.shape[0])), *((0, n) for n in labels.shape[1:]))
            sink.write(region, labels[start : start + 64], None)
        sink.commit()
        coarse = open_result(tmp_path / f"{name}.ome.zarr" / "labels" / "labels" / "1")
        as_input = open_source(str(tmp_path / f"{name}.ome.zarr" / "1"), labels.ndim).geometry  # the image's level 1
        assert as_input == (VolumeGeometry(tuple(map(tuple, coarse.attrs["affine"]))) if name == "vol" else
                            RasterGeometry(crs, tuple(coarse.rio.transform().to_gdal())))  # fmt: skip
        stored = np.asarray(zarr.open_array(tmp_path / f"{name}.ome.zarr" / "labels" / "labels" / "1", mode="r"))
        np.testing.assert_array_equal(coarse.values, stored)
        assert coarse.attrs["class_names"] == list(CLASSES)
        assert coarse.attrs["_FillValue"] == 255  # nodata, not a class
        if name == "vol":
            fine, placed = np.asarray(geometry.affine), np.asarray(coarse.attrs["affine"])
            for i, j, k in ((0, 0, 0), (7, 3, 5), (149, 19, 14)):
                block = [fine @ (2 * i + a, 2 * j + b, 2 * k + c, 1) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
                np.testing.assert_allclose(placed @ (i, j, k, 1), np.mean(block, axis=0), atol=1e-9)
        else:
            fine, placed = rasterio.transform.Affine.from_gdal(*transform), coarse.rio.transform()
            assert coarse.rio.crs.to_epsg() == 32633
            for row, col in ((0, 0), (11, 30), (259, 44)):
                block = [rasterio.transform.xy(fine, 2 * row + a, 2 * col + b) for a in (0, 1) for b in (0, 1)]
                np.testing.assert_allclose(rasterio.transform.xy(placed, row, col), np.mean(block, axis=0))


def test_nifti_probabilities_open_as_nibabel_reads_them(tmp_path):
    """``open_result(labels.nii.gz, "probabilities")`` was refused ('probabilities are read from .tif or .zarr
    outputs') though tilemask writes them beside NIfTI labels, 4D with classes last."""
    import nibabel as nib

    from tilemask.geometry import VolumeGeometry

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=(20, 18, 12)).astype(np.uint8)
    probabilities = rng.random((3, 20, 18, 12)).astype(np.float32)
    affine = tuple(tuple(r) for r in [[0, -0.8, 0, 10], [0.9, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    layout = OutputLayout(labels.shape, (16, 16, 16), CLASSES, "uint8", 3, "float32", VolumeGeometry(affine),
                          str(tmp_path / "scan.nii.gz"))  # fmt: skip
    path = str(tmp_path / "labels.nii.gz")
    sink = make_sink(path, layout)
    sink.create()
    for i in (0, 16):
        for j in (0, 16):
            region = ((i, min(i + 16, 20)), (j, min(j + 16, 18)), (0, 12))
            index = tuple(slice(lo, hi) for lo, hi in region)
            sink.write(region, labels[index], probabilities[(slice(None), *index)])
    sink.commit()
    opened = open_result(path, "probabilities", chunks=8)
    reference = nib.load(tmp_path / "labels_probabilities.nii.gz")
    assert opened.dims == ("class", "i", "j", "k") and opened.data.chunks[1:] == ((8, 8, 4), (8, 8, 2), (8, 4))
    np.testing.assert_array_equal(opened.values, np.moveaxis(reference.get_fdata(dtype=np.float32), 3, 0))
    np.testing.assert_allclose(opened.attrs["affine"], reference.affine)
    assert opened.attrs["class_names"] == list(CLASSES)
    (tmp_path / "labels_probabilities.nii.gz").unlink()
    with pytest.raises(InputError, match=r"labels.nii.gz: has no probabilities beside it \(labels_probabilities"):
        open_result(path, "probabilities")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".zarr", ".ome.zarr"])
def test_a_zarr_output_with_a_damaged_chunk_is_named_by_stats_and_evaluate(tmp_path, suffix):
    """A fault sweep: a label Zarr or OME-Zarr whose chunk in the middle does not decompress failed ``tilemask
    stats`` and ``evaluate`` as ``tilemask: error: RuntimeError: Zstd decompression error: invalid input data``,
    naming neither the file nor where; a NIfTI's or a GeoTIFF's broken block is named with its window."""
    from tests.conftest import run_cli

    labels = np.random.default_rng(4).integers(0, 3, size=(600, 700)).astype(np.uint8)
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (256, 256), CLASSES, "uint8", 0, "none", geometry, "input.tif", 255)
    path = tmp_path / f"mask{suffix}"
    drive(make_sink(str(path), layout), labels, None)
    truth = tmp_path / "truth.tif"
    with rasterio.open(truth, "w", driver="GTiff", width=700, height=600, count=1, dtype="uint8", crs="EPSG:32618",
                       transform=Affine(30, 0, 500000, 0, -30, 4000000)) as dst:  # fmt: skip
        dst.write(labels, 1)
    chunk = path / {".zarr": "labels", ".ome.zarr": "labels/labels/0"}[suffix] / "c" / "1" / "1"  # rows 256:512
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    where = re.escape(f"{path}: read failed at [256:512, 256:512]: ")
    for args, table in ((["stats", path, "-o", tmp_path / "t.parquet"], "t.parquet"),
                        (["evaluate", path, truth, "-o", tmp_path / "scores.json"], "scores.json"),
                        (["evaluate", truth, path], None)):  # fmt: skip
        done = run_cli(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, (args, done.stderr)
        assert re.match(rf"^tilemask: error: {where}\S", lines[0]), lines[0]
        assert table is None or not (tmp_path / table).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, truth.name])


@pytest.mark.timeout(120)
def test_an_ome_zarr_label_image_of_one_time_point_is_read_as_its_labels(tmp_path):
    """bioformats2raw writes every image t, c, z, y, x, and its label images t, z, y, x: the input reader read one
    time point's volume, the label reader refused it ("a label image has space axes only; this OME-Zarr's are t, z,
    y, x"). It reads that point's labels, as ome-zarr-py reads them, with the z, y, x image's grid; several time
    points are refused, named."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from tilemask.stats.api import compute_stats

    labels = (np.indices((20, 18, 12)).sum(axis=0) % 3).astype(np.uint8)
    scale = [2.5, 0.8, 0.8]
    tables, opened = [], []
    for axes, data in (("zyx", labels), ("tzyx", labels[None]), ("tzyx", np.stack([labels, labels]))):
        store = tmp_path / f"{axes}{len(data)}.ome.zarr"
        root = zarr.open_group(store, mode="w", zarr_format=3)
        image = root.create_group("labels/regions")
        image.create_array("0", data=data, chunks=(1,) * (data.ndim - 3) + (10, 9, 6), dimension_names=tuple(axes))
        image.attrs["ome"] = {"version": "0.5", "image-label": {}, "multiscales": [{
            "axes": [{"name": n, "type": "time"} if n == "t" else {"name": n, "type": "space", "unit": "millimeter"}
                     for n in axes],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                                      "scale": [1.0] * (data.ndim - 3) + scale}]}],
        }]}  # fmt: skip
        root["labels"].attrs["ome"] = {"version": "0.5", "labels": ["regions"]}
        root.attrs["ome"] = {"version": "0.5"}
        if data.ndim == 4 and len(data) == 2:
            for path in (store, store / "labels" / "regions" / "0"):
                with pytest.raises(InputError, match=r"regions(/0)?: a label image has space axes only, or a time "
                                                     r"axis of one point before them; this OME-Zarr's are t, z, y, x "
                                                     r"\(several time points: give one's\)$"):  # fmt: skip
                    open_result(path)
            continue
        (node,) = [n for n in Reader(parse_url(str(store / "labels" / "regions")))() if n.data]
        np.testing.assert_array_equal(np.asarray(node.data[0]).reshape(labels.shape), labels)  # ome-zarr-py's reading
        for path in (store, store / "labels" / "regions" / "0"):
            opened.append(open_result(path))
        tables.append(pd.read_csv(compute_stats(store / "labels" / "regions" / "0", tmp_path / f"{axes}.csv")))
    for result in opened:
        np.testing.assert_array_equal(result.values, labels)
        np.testing.assert_array_equal(result.attrs["affine"], opened[0].attrs["affine"])
    pd.testing.assert_frame_equal(tables[1], tables[0])
    assert list(tables[1]["voxels"]) == [int((labels == value).sum()) for value in range(3)]
    np.testing.assert_allclose(tables[1]["volume_ml"], tables[1]["voxels"] * np.prod(scale) / 1000)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".zarr", ".ome.zarr"])
def test_a_zarr_output_missing_a_chunk_is_refused_not_read_as_background(tmp_path, suffix):
    """zarr leaves out a chunk that is all fill value, so a chunk lost from an output's labels (a copy cut short)
    read as background: ``tilemask stats`` counted its pixels as class 0, exit 0. An output now stores every chunk
    of its labels, background ones too, and one missing a chunk is refused by name, before any pixel is read."""
    from tests.conftest import run_cli

    labels = np.random.default_rng(4).integers(1, 3, size=(600, 700)).astype(np.uint8)
    labels[:256, :256] = 0  # a chunk all background
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (256, 256), CLASSES, "uint8", 0, "none", geometry, "input.tif", 255)
    path = tmp_path / f"mask{suffix}"
    drive(make_sink(str(path), layout), labels, None)
    key = {".zarr": "labels", ".ome.zarr": "labels/labels/0"}[suffix]
    stored = zarr.open_array(path / key, mode="r")
    assert stored.nchunks_initialized == stored.nchunks == 9  # the background chunk too
    np.testing.assert_array_equal(open_result(path).values, labels)
    (path / key / "c" / "0" / "0").unlink()
    message = (rf"{re.escape(str(path))}: 1 of the 9 chunks of its labels \({key}\) are missing; a copy cut short\? "
               r"Copy the output again, or run the workflow again$")  # fmt: skip
    with pytest.raises(InputError, match=message):
        open_result(path)
    done = run_cli("stats", path, "-o", tmp_path / "t.csv")
    assert done.returncode == 2 and re.match(rf"^tilemask: error: {message}", done.stderr.strip()), done.stderr
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.timeout(60)
def test_a_cogs_probabilities_file_opened_as_labels_says_how_to_open_it(outputs):
    """A run's ``outputs`` list the probabilities COG beside the labels; ``open_result`` on it, as on each of the
    others, was 'a label image has one band, this raster has 3', which did not say that ``variable="probabilities"``
    on the labels' path opens it."""
    paths, _, probabilities, _ = outputs
    beside = paths[".tif"].replace("mask.tif", "mask_probabilities.tif")
    assert Path(beside).exists()
    with pytest.raises(InputError) as refused:
        open_result(beside)
    assert str(refused.value) == (f"{beside}: the probabilities beside the labels {paths['.tif']}, not labels: give "
                                  f"the labels (in Python open_result({paths['.tif']!r}, 'probabilities') opens these)"
                                  ), str(refused.value)  # fmt: skip
    np.testing.assert_array_equal(open_result(paths[".tif"], "probabilities").values, probabilities)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".zarr", ".ome.zarr"])
def test_a_zarr_output_on_a_web_server_that_lists_no_folders_is_read(tmp_path, suffix):
    """A web server need not list a folder (nginx's default, a bucket's website endpoint: a 404): fsspec then
    finds no chunk under the labels, and an output there read as "9 of the 9 chunks of its labels are missing",
    where it read before outputs stored every chunk. A web server's store is not counted."""
    import functools
    import http.server

    from .range_server import RangeHandler

    class NoListing(RangeHandler):
        def list_directory(self, path):
            self.send_error(404, "no listing")

    labels = np.random.default_rng(4).integers(1, 3, size=(600, 700)).astype(np.uint8)
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (256, 256), CLASSES, "uint8", 0, "none", geometry, "input.tif", 255)
    drive(make_sink(str(tmp_path / f"mask{suffix}"), layout), labels, None)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(NoListing, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = open_result(f"http://127.0.0.1:{server.server_address[1]}/mask{suffix}")
        np.testing.assert_array_equal(remote.values, labels)
    finally:
        server.shutdown()


@pytest.mark.timeout(120)
def test_an_ome_zarr_outputs_coarser_levels_store_every_chunk_and_one_missing_a_chunk_is_refused(tmp_path):
    """Level 0 of an OME-Zarr's labels stored every chunk, its coarser levels (made at finish) left out the
    all-background ones, and a level read by its path (``stats`` of ``labels/labels/1``, the zoomed-out tiles of
    ``tilemask serve``) with a chunk lost read it as background, exit 0. Every level stores every chunk now, and a
    level missing one is refused, named."""
    labels = np.random.default_rng(4).integers(1, 3, size=(1100, 1100)).astype(np.uint8)
    labels[:512, :512] = 0  # level 1's first chunk all background
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (256, 256), CLASSES, "uint8", 0, "none", geometry, "input.tif", 255)
    path = tmp_path / "mask.ome.zarr"
    drive(make_sink(str(path), layout), labels, None)
    for level in ("0", "1", "2"):
        stored = zarr.open_array(path / "labels" / "labels" / level, mode="r")
        assert stored.nchunks_initialized == stored.nchunks, level
    level1 = path / "labels" / "labels" / "1"
    assert open_result(level1).shape == (550, 550)
    (level1 / "c" / "1" / "1").unlink()
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: 1 of the 9 chunks of its labels "
                                         r"\(labels/labels/1\) are missing"):  # fmt: skip
        open_result(level1)
    np.testing.assert_array_equal(open_result(path).values, labels)  # level 0 is whole


@pytest.mark.timeout(120)
def test_a_local_outputs_chunks_are_counted_from_its_folder_not_through_zarr(tmp_path, monkeypatch):
    """Every open of a Zarr output (``open_result``, ``stats``, each listing of ``tilemask serve``'s catalog)
    counts its labels' chunks; zarr's count walked the store through its async listing: 1.6 s for 16,384 chunks,
    where the folder's own walk takes 7 ms. A local output's chunks are counted from its folder; a missing one
    is still found."""
    labels = np.random.default_rng(4).integers(1, 3, size=(600, 700)).astype(np.uint8)
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (256, 256), CLASSES, "uint8", 0, "none", geometry, "input.tif", 255)
    path = tmp_path / "mask.zarr"
    drive(make_sink(str(path), layout), labels, None)

    def listed(self):
        raise AssertionError("counted through zarr's listing")

    monkeypatch.setattr(zarr.Array, "nchunks_initialized", property(listed))
    np.testing.assert_array_equal(open_result(path).values, labels)
    (path / "labels" / "c" / "1" / "2").unlink()
    with pytest.raises(InputError, match=r": 1 of the 9 chunks of its labels \(labels\) are missing"):
        open_result(path)


@pytest.mark.timeout(60)
def test_an_ome_zarr_label_image_whose_axes_outnumber_its_arrays_is_not_said_to_have_several_time_points(tmp_path):
    """A label image whose multiscale names t, z, y, x over a z, y, x array was refused as "(several time points:
    give one's)": it has none. The message says what is wrong: the array's axes."""
    store = tmp_path / "x.ome.zarr"
    root = zarr.open_group(store, mode="w", zarr_format=3)
    image = root.create_group("labels/regions")
    image.create_array("0", data=np.zeros((4, 5, 6), np.uint8), chunks=(4, 5, 6))
    image.attrs["ome"] = {"version": "0.5", "image-label": {}, "multiscales": [{
        "axes": [{"name": "t", "type": "time"}, *({"name": n, "type": "space"} for n in "zyx")],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 4}]}]}]}  # fmt: skip
    root["labels"].attrs["ome"] = {"version": "0.5", "labels": ["regions"]}
    root.attrs["ome"] = {"version": "0.5"}
    with pytest.raises(InputError, match=r"this OME-Zarr's are t, z, y, x \(its array has 3 axes\)$"):
        open_result(store)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_a_one_class_niftis_probabilities_opened_as_labels_says_how_to_open_them(tmp_path, dtype):
    """A sigmoid network's NIfTI probabilities are 4D with one class last, which a label image may be (a trailing
    axis of one): ``open_result`` on them opened them as labels, the hint of the probabilities beside never given.
    In float32 reading them then failed ("must be whole numbers"); in uint8 they read as labels 0-255."""
    from tests.conftest import run_cli
    from tilemask.geometry import VolumeGeometry

    labels = np.random.default_rng(3).integers(0, 2, size=(12, 10, 8)).astype(np.uint8)
    probabilities = (np.random.default_rng(4).random((1, 12, 10, 8)) * (255 if dtype == "uint8" else 1)).astype(dtype)
    affine = tuple(tuple(r) for r in np.diag([0.8, 0.8, 2.5, 1.0]).tolist())
    layout = OutputLayout(labels.shape, (16, 16, 16), ("background", "lesion"), "uint8", 1, dtype,
                          VolumeGeometry(affine), str(tmp_path / "scan.nii.gz"), 255)  # fmt: skip
    path = str(tmp_path / "mask.nii.gz")
    sink = make_sink(path, layout)
    sink.create()
    sink.write(((0, 12), (0, 10), (0, 8)), labels, probabilities)
    sink.commit()
    beside = str(tmp_path / "mask_probabilities.nii.gz")
    assert Path(beside).exists()
    said = (f"{beside}: the probabilities beside the labels {path}, not labels: give the labels (in Python "
            f"open_result({path!r}, 'probabilities') opens these)")  # fmt: skip
    with pytest.raises(InputError) as refused:
        open_result(beside).values
    assert str(refused.value) == said, str(refused.value)
    np.testing.assert_array_equal(open_result(path).values, labels)
    done = run_cli("stats", beside, "-o", tmp_path / "t.csv")  # stats read them as labels, uint8 ones as 0-255
    assert (done.returncode, done.stderr.strip()) == (2, f"tilemask: error: {said}"), done.stderr
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.timeout(60)
def test_a_label_image_of_the_users_named_like_probabilities_opens_as_labels(tmp_path):
    """The probabilities hint is only for the file beside labels tilemask wrote: a user's own label image named
    ``<stem>_probabilities.tif`` beside another ``<stem>.tif`` opens as the labels it is."""
    labels = np.random.default_rng(6).integers(0, 3, size=(20, 30)).astype(np.uint8)
    for name in ("own.tif", "own_probabilities.tif"):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=30, height=20, count=1, dtype="uint8",
                           transform=Affine(1, 0, 0, 0, -1, 20)) as ds:  # fmt: skip
            ds.write(labels, 1)
    np.testing.assert_array_equal(open_result(str(tmp_path / "own_probabilities.tif")).values, labels)


@pytest.mark.timeout(120)
def test_a_zarr_output_opens_in_xarray_with_the_dimensions_open_result_names(outputs, tmp_path):
    """``xr.open_zarr(out.zarr)``, what an xarray user tries first on a Zarr v3 group, was a KeyError ("Zarr object
    is missing the `dimension_names` metadata which is required for xarray to determine variable dimensions"): the
    arrays now name their axes as ``open_result`` does, (y, x) and (class, y, x), or (i, j, k) for a volume."""
    from tilemask.geometry import VolumeGeometry

    paths, labels, probabilities, _ = outputs
    opened = xr.open_zarr(paths[".zarr"])
    assert opened["labels"].dims == ("y", "x") and opened["probabilities"].dims == ("class", "y", "x")
    np.testing.assert_array_equal(opened["labels"].values, labels)  # class 0 kept: the fill value masks nothing
    np.testing.assert_allclose(opened["probabilities"].values, probabilities / 255, rtol=1e-6)  # their scale
    assert open_result(paths[".zarr"]).dims == opened["labels"].dims

    volume = np.random.default_rng(2).integers(0, 3, size=(20, 18, 12)).astype(np.uint8)
    affine = tuple(tuple(r) for r in np.diag([0.8, 0.8, 2.5, 1.0]).tolist())
    layout = OutputLayout(volume.shape, (20, 18, 12), CLASSES, "uint8", 3, "float32", VolumeGeometry(affine),
                          str(tmp_path / "scan.nii.gz"), 255)  # fmt: skip
    path = str(tmp_path / "labels.zarr")
    sink = make_sink(path, layout)
    sink.create()
    sink.write(((0, 20), (0, 18), (0, 12)), volume, np.ones((3, 20, 18, 12), np.float32) / 3)
    sink.commit()
    opened = xr.open_zarr(path)
    assert opened["labels"].dims == ("i", "j", "k") and opened["probabilities"].dims == ("class", "i", "j", "k")
    np.testing.assert_array_equal(opened["labels"].values, volume)
    assert open_result(path, "probabilities").dims == opened["probabilities"].dims


@pytest.mark.timeout(120)
def test_zarr_uint8_probabilities_say_their_scale_to_xarray(outputs):
    """uint8 probabilities are ``round(p * 255)``: ``xr.open_zarr`` gave them as 0-255 with no word of it (``p > 0.5``
    held wherever p was 1/255 or more), where the COG's band scale and ``open_result`` say 1/255. The array carries
    CF's ``scale_factor`` and ``add_offset`` now, which xarray decodes to 0-1."""
    paths, _, probabilities, _ = outputs
    decoded = xr.open_zarr(paths[".zarr"])["probabilities"]
    np.testing.assert_allclose(decoded.values, probabilities / 255, rtol=1e-6)
    raw = xr.open_zarr(paths[".zarr"], mask_and_scale=False)["probabilities"]
    assert raw.dtype == np.uint8 and (raw.attrs["scale_factor"], raw.attrs["add_offset"]) == (1 / 255, 0.0)
    np.testing.assert_array_equal(open_result(paths[".zarr"], "probabilities").values, probabilities)  # as stored


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".zarr", ".ome.zarr"])
def test_a_zarr_outputs_unwritten_chunks_read_as_nodata_not_as_class_0(tmp_path, suffix):
    """A review's: the labels' zarr ``fill_value`` was 0 where their nodata is 255, so a chunk never written (a run
    killed, its staged group read by zarr or xarray) read as class 0, and its float32 probabilities as 0. The fill
    value is now the labels' nodata, and float32 probabilities' NaN (no probability); uint8 ones keep 0, every value
    being one; without nodata the labels' stays 0."""
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 3, size=(512, 512)).astype(np.uint8)
    labels[:20] = 255
    probabilities = rng.random((3, 512, 512)).astype(np.float32)
    probabilities[:, :10, :10] = 0.0
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4e6, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (256, 256), CLASSES, "uint8", 3, "float32", geometry, "input.tif", 255)
    keys = {".zarr": ("labels", "probabilities"), ".ome.zarr": ("labels/labels/0", "0")}
    labels_key, probabilities_key = keys[suffix]
    sink = make_sink(str(tmp_path / f"mask{suffix}"), layout)
    sink.create()
    sink.write(((0, 256), (0, 256)), labels[:256, :256], probabilities[:, :256, :256])  # then the run is killed
    staged = zarr.open_group(sink.staged, mode="r")
    assert staged[labels_key].fill_value == 255
    np.testing.assert_array_equal(staged[labels_key][256:, 256:], 255)  # nodata, not class 0
    assert np.isnan(staged[probabilities_key][:, 256:, 256:]).all()
    if suffix == ".zarr":  # as xarray reads it (an OME-Zarr's arrays sit in groups of their own)
        killed = xr.open_zarr(sink.staged, consolidated=False)
        assert killed["labels"].encoding["fill_value"] == 255
        np.testing.assert_array_equal(killed["labels"].values[256:, 256:], 255)
        np.testing.assert_array_equal(killed["labels"].values[:256, :256], labels[:256, :256])
        assert np.isnan(killed["probabilities"].values[:, 256:, 256:]).all()
        np.testing.assert_array_equal(killed["probabilities"].values[:, :256, :256], probabilities[:, :256, :256])
    for r, c in ((0, 256), (256, 0), (256, 256)):
        sink.write(((r, r + 256), (c, c + 256)), labels[r : r + 256, c : c + 256],
                   probabilities[:, r : r + 256, c : c + 256])  # fmt: skip
    sink.commit()
    opened = open_result(tmp_path / f"mask{suffix}")
    assert opened.dtype == np.uint8 and opened.attrs["_FillValue"] == 255
    np.testing.assert_array_equal(opened.values, labels)
    np.testing.assert_array_equal(open_result(tmp_path / f"mask{suffix}", "probabilities").values, probabilities)
    if suffix == ".zarr":
        plain = xr.open_zarr(tmp_path / f"mask{suffix}")  # Zarr v3's default: the fill value masks nothing
        assert plain["labels"].dtype == np.uint8 and plain["labels"].encoding["fill_value"] == 255
        np.testing.assert_array_equal(plain["labels"].values, labels)

    none = replace(layout, nodata=None, probabilities_dtype="uint8", run_id=new_run_id())  # no nodata: 0 stays the fill
    sink = make_sink(str(tmp_path / f"plain{suffix}"), none)
    sink.create()
    staged = zarr.open_group(sink.staged, mode="r")
    assert staged[labels_key].fill_value == 0 and staged[probabilities_key].fill_value == 0
    sink.abort()
