"""COG sink: strict COG validity, georeferencing, overviews, nodata, class metadata, failure cleanup.

The sink is driven as the engine drives it: ``create()`` on the client, one
``write()`` per chunk from worker processes (a 2-process ``LocalCluster``) or a
loop, ``commit()`` on the client.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rio_cogeo.cogeo import cog_validate
from scipy import ndimage

from tilemask.errors import OutputError
from tilemask.geometry import RasterGeometry
from tilemask.sinks import OutputLayout, make_sink
from tilemask.sinks.cog import CogSink
from tilemask.sources.labels import open_labels

from .conftest import GEO, REPO


def chunk_regions(shape, chunks):
    (h, w), (ch, cw) = shape, chunks
    return [((r, min(r + ch, h)), (c, min(c + cw, w))) for r in range(0, h, ch) for c in range(0, w, cw)]


def write_chunk(sink, region, labels, probabilities):
    (r0, r1), (c0, c1) = region
    sink.write(region, labels[r0:r1, c0:c1], None if probabilities is None else probabilities[:, r0:r1, c0:c1])


def drive(sink, labels, probabilities=None, client=None):
    """create, write every chunk (on the cluster when given, in a shuffled order), commit."""
    sink.create()
    regions = chunk_regions(sink.layout.shape, sink.layout.chunks)
    order = np.random.default_rng(1).permutation(len(regions))
    regions = [regions[i] for i in order]
    if client is None:
        for region in regions:
            write_chunk(sink, region, labels, probabilities)
    else:
        labels_f = client.scatter(labels, broadcast=True)
        probs_f = client.scatter(probabilities, broadcast=True) if probabilities is not None else None
        client.gather(client.map(write_chunk, [sink] * len(regions), regions, [labels_f] * len(regions),
                                 [probs_f] * len(regions), pure=False))  # fmt: skip
    return sink.commit()


def layout_for(reference, labels, classes, chunks, nodata, probabilities="none"):
    with rasterio.open(reference) as src:
        geometry = RasterGeometry(src.crs.to_wkt() if src.crs else None, tuple(src.transform.to_gdal()))
    return OutputLayout(
        shape=labels.shape,
        chunks=chunks,
        class_names=tuple(classes),
        labels_dtype=str(labels.dtype),
        probability_channels=0 if probabilities == "none" else len(classes),
        probabilities_dtype=probabilities,
        geometry=geometry,
        reference=str(reference),
        nodata=nodata,
    )


def one_hot(labels, n, dtype):
    stack = np.stack([(labels == k) for k in range(n)]).astype(np.float32)
    return np.rint(stack * 255).astype(np.uint8) if dtype == "uint8" else stack


def overview_values(path):
    with rasterio.open(path) as ds:
        factors = ds.overviews(1)
        values = []
        for level in range(len(factors)):
            with rasterio.open(path, overview_level=level) as ov:
                values.append(np.unique(ov.read(1)))
    return factors, values


def assert_same_grid(path, reference):
    with rasterio.open(path) as out, rasterio.open(reference) as ref:
        assert out.crs == ref.crs
        assert out.transform == ref.transform
        assert (out.height, out.width) == (ref.height, ref.width)


def assert_only_finished(folder: Path, expected: set[str]):
    assert {p.name for p in folder.iterdir()} == expected


@pytest.fixture(scope="module")
def shade_labels():
    """Four classes from the hillshade's brightness, its nodata (255) carried to the labels."""
    with rasterio.open(GEO["shade.tif"]) as src:
        data = src.read(1)
    labels = np.digitize(data, [60, 120, 180]).astype(np.uint8)
    labels[data == 255] = 255
    return labels


def test_shade_cog_with_nodata_and_probabilities(tmp_path, client, shade_labels):
    labels = shade_labels
    classes = ("background", "dark", "mid", "bright")
    layout = layout_for(GEO["shade.tif"], labels, classes, (300, 300), 255, "uint8")
    sink = make_sink(str(tmp_path / "shade_mask.tif"), layout)
    assert isinstance(sink, CogSink)
    probabilities = one_hot(np.where(labels == 255, 0, labels), 4, "uint8")
    written = drive(sink, labels, probabilities, client)

    mask, probs = tmp_path / "shade_mask.tif", tmp_path / "shade_mask_probabilities.tif"
    assert written == [str(mask), str(probs)]
    assert_only_finished(tmp_path, {"shade_mask.tif", "shade_mask.tif.aux.xml", "shade_mask_probabilities.tif"})
    for path in (mask, probs):
        valid, errors, warnings = cog_validate(str(path), strict=True)
        assert valid, (errors, warnings)
        assert_same_grid(path, GEO["shade.tif"])
    with rasterio.open(mask) as ds:
        assert ds.nodata == 255
        assert ds.block_shapes[0] == (512, 512)
        assert ds.compression.name == "zstd"
        assert np.array_equal(ds.read(1), labels)
        assert np.array_equal(ds.read_masks(1) == 0, labels == 255)  # nodata exact, pixel for pixel
        assert json.loads(ds.tags()["TILEMASK_CLASSES"]) == list(classes)
        colormap = ds.colormap(1)
        assert len({colormap[v][:3] for v in range(4)}) == 4
    factors, values = overview_values(mask)
    assert factors
    for level in values:
        assert set(level.tolist()) <= {0, 1, 2, 3, 255}
    aux = (tmp_path / "shade_mask.tif.aux.xml").read_text()
    assert "<Category>bright</Category>" in aux and "GDALRasterAttributeTable" in aux
    with rasterio.open(probs) as ds:
        assert ds.count == 4 and ds.dtypes == ("uint8",) * 4
        assert np.array_equal(ds.read(), probabilities)
        assert ds.scales == (1 / 255,) * 4  # round(p * 255)
        assert np.array_equal(ds.dataset_mask() == 0, labels == 255)  # the labels' nodata is the file's mask
    with rasterio.open(probs, overview_level=0) as ov:  # AVERAGE over valid pixels only: one-hot sums stay 255
        sums, valid = ov.read().astype(int).sum(0), ov.dataset_mask() > 0
        assert valid.any() and not valid.all()
        assert sums[valid].min() >= 255 - 4, "nodata's zeros were averaged into the overview"  # rounding per band
    # open_labels, the reader of statistics and polygons, sees the class names and nodata
    image = open_labels(str(mask))
    assert image.class_names == classes and image.nodata == 255


def test_rgb_byte_georeferencing_without_nodata(tmp_path):
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        red = src.read(1)
    labels = (red > 100).astype(np.uint8)
    layout = layout_for(GEO["RGB.byte.tif"], labels, ("background", "bright"), (256, 256), None)
    path = tmp_path / "rgb.tif"
    drive(CogSink(str(path), layout), labels)
    assert cog_validate(str(path), strict=True)[0]
    assert_same_grid(path, GEO["RGB.byte.tif"])
    with rasterio.open(path) as ds:
        assert ds.nodata is None
        assert np.array_equal(ds.read(1), labels)
    _, values = overview_values(path)
    assert all(set(v.tolist()) <= {0, 1} for v in values)


@pytest.mark.parametrize("window", [(slice(None), slice(400, 401)), (slice(300, 301), slice(None))])
def test_a_one_pixel_wide_or_high_raster_is_a_valid_cog(tmp_path, window):
    """A 1 x 718 column had overviews 1 pixel wide (decimation 1), which rio-cogeo refuses.  It now has none, which
    ``--strict`` warns about (over 512 pixels high); no layout of a 1-pixel-wide raster that tall passes it."""
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        red = src.read(1)[window]
        transform = src.transform @ Affine.translation(window[1].start or 0, window[0].start or 0)
        reference = tmp_path / "thin.tif"
        profile = {**src.profile, "count": 1, "width": red.shape[1], "height": red.shape[0], "transform": transform}
    with rasterio.open(reference, "w", **profile) as dst:
        dst.write(red, 1)
    labels = (red > 100).astype(np.uint8)
    layout = layout_for(reference, labels, ("background", "bright"), (256, 256), None, "uint8")
    drive(CogSink(str(tmp_path / "out" / "thin_mask.tif"), layout), labels, one_hot(labels, 2, "uint8"))
    one_wide = labels.shape[1] == 1
    for name in ("thin_mask.tif", "thin_mask_probabilities.tif"):
        valid, errors, warnings = cog_validate(str(tmp_path / "out" / name), strict=not one_wide)
        assert valid, (errors, warnings)
        assert not one_wide or (len(warnings) == 1 and "overviews" in warnings[0]), warnings  # its one: no overviews
    with rasterio.open(tmp_path / "out" / "thin_mask.tif") as ds:
        assert np.array_equal(ds.read(1), labels)


def test_geographic_crs_float32_probabilities(tmp_path):
    """A synthetic raster in EPSG:4326, uneven chunks, float32 probabilities, 3 classes."""
    rng = np.random.default_rng(7)
    shape = (1300, 1700)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 8)
    labels = np.digitize(field, np.quantile(field, [0.5, 0.8])).astype(np.uint8)
    reference = tmp_path / "input.tif"
    transform = Affine(0.0005, 0, 10.0, 0, -0.0005, 47.0)
    with rasterio.open(reference, "w", driver="GTiff", width=shape[1], height=shape[0], count=1, dtype="uint8",
                       crs="EPSG:4326", transform=transform) as dst:  # fmt: skip
        dst.write(labels, 1)
    layout = layout_for(reference, labels, ("background", "forest", "water"), (512, 700), None, "float32")
    probabilities = one_hot(labels, 3, "float32") * 0.75
    drive(CogSink(str(tmp_path / "out" / "mask.tif"), layout), labels, probabilities)
    for name in ("mask.tif", "mask_probabilities.tif"):
        path = tmp_path / "out" / name
        assert cog_validate(str(path), strict=True)[0]
        assert_same_grid(path, reference)
    with rasterio.open(tmp_path / "out" / "mask_probabilities.tif") as ds:
        assert ds.dtypes[0] == "float32"
        assert np.array_equal(ds.read(), probabilities)
        assert ds.descriptions == ("background", "forest", "water")
    _, values = overview_values(tmp_path / "out" / "mask.tif")
    assert len(values) >= 2 and all(set(v.tolist()) <= {0, 1, 2} for v in values)


def test_a_sigmoids_one_probability_band_is_named_for_the_foreground(tmp_path):
    """A sigmoid's one channel is the foreground's probability (classes ``[background, foreground]``): the band was
    described as class 0, so QGIS named the water probability of a land/water model ``land``."""
    labels = np.zeros((100, 120), np.uint8)
    labels[40:, 50:] = 1
    probabilities = np.where(labels == 1, 230, 20).astype(np.uint8)[None]
    layout = layout_for(GEO["RGB.byte.tif"], labels, ("land", "water"), (64, 64), None, probabilities="uint8")
    layout = dataclasses.replace(layout, probability_channels=1)
    labels_path, probabilities_path = drive(CogSink(str(tmp_path / "mask.tif"), layout), labels, probabilities)
    with rasterio.open(probabilities_path) as ds:
        assert ds.count == 1 and ds.descriptions == ("water",)
        assert json.loads(ds.tags()["TILEMASK_CLASSES"]) == ["land", "water"]


def test_abort_leaves_nothing(tmp_path, shade_labels):
    layout = layout_for(GEO["shade.tif"], shade_labels, ("a", "b", "c", "d"), (256, 256), 255, "uint8")
    sink = CogSink(str(tmp_path / "mask.tif"), layout)
    sink.create()
    for region in chunk_regions(layout.shape, layout.chunks)[:5]:
        write_chunk(sink, region, shade_labels, one_hot(shade_labels, 4, "uint8"))
    for raster in sink.rasters:  # what a commit killed half-way leaves beside the output
        for suffix in ("", ".aux.xml", ".ovr.tmp"):
            Path(raster.partial + suffix).write_bytes(b"half")
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_missing_chunk_fails_commit_without_a_finished_file(tmp_path, shade_labels):
    layout = layout_for(GEO["shade.tif"], shade_labels, ("a", "b", "c", "d"), (256, 256), 255)
    sink = CogSink(str(tmp_path / "mask.tif"), layout)
    sink.create()
    for region in chunk_regions(layout.shape, layout.chunks)[1:]:
        write_chunk(sink, region, shade_labels, None)
    with pytest.raises(OutputError, match="never written"):
        sink.commit()
    assert not (tmp_path / "mask.tif").exists()
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_rerun_replaces_output_and_stale_sidecar(tmp_path, shade_labels):
    path = tmp_path / "mask.tif"
    path.write_bytes(b"old")
    (tmp_path / "mask.tif.aux.xml").write_text("<PAMDataset/>")
    layout = layout_for(GEO["shade.tif"], shade_labels, ("a", "b", "c", "d"), (512, 512), 255)
    drive(CogSink(str(path), layout), shade_labels)
    assert cog_validate(str(path), strict=True)[0]
    assert "<Category>d</Category>" in (tmp_path / "mask.tif.aux.xml").read_text()
    assert_only_finished(tmp_path, {"mask.tif", "mask.tif.aux.xml"})


@pytest.mark.timeout(60)
def test_class_names_beyond_ascii_are_written_whatever_the_locale(tmp_path):
    """The VRT of the pieces was written in the locale's encoding, GDAL reads it as UTF-8: under an ASCII locale
    (``LC_ALL=C``, locale coercion and UTF-8 mode off) classes named ``forêt`` and ``水田`` failed the commit with
    ``UnicodeEncodeError: 'ascii' codec can't encode character '\\xea'`` (a bug's traceback), and a Latin-1
    locale would write names GDAL does not read."""
    script = f"""
import numpy as np
from tilemask.geometry import RasterGeometry
from tilemask.sinks import OutputLayout
from tilemask.sinks.cog import CogSink
from tilemask.sources.labels import open_labels
labels = np.arange(3, dtype=np.uint8).repeat(300).reshape(30, 30)
layout = OutputLayout((30, 30), (16, 16), ("eau", "for\\u00eat", "\\u6c34\\u7530"), "uint8", 0, "none",
                      RasterGeometry("EPSG:32618", (500000.0, 10.0, 0.0, 4000000.0, 0.0, -10.0)), "x.tif", None)
sink = CogSink({str(tmp_path / "mask.tif")!r}, layout)
sink.create()
for r in (0, 16):
    for c in (0, 16):
        sink.write(((r, min(r + 16, 30)), (c, min(c + 16, 30))), labels[r : r + 16, c : c + 16], None)
sink.commit()
print(ascii(open_labels({str(tmp_path / "mask.tif")!r}).class_names))
"""
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")[-2000:]
    assert done.stdout.decode().strip() == ascii(("eau", "for\u00eat", "\u6c34\u7530"))
    sidecar = (tmp_path / "mask.tif.aux.xml").read_text(encoding="utf-8")
    assert "<Category>for\u00eat</Category>" in sidecar and "<F>\u6c34\u7530</F>" in sidecar


def test_the_class_sidecar_is_written_where_the_environment_turns_gdals_pam_off(tmp_path, shade_labels, monkeypatch):
    """``GDAL_PAM_ENABLED=NO``, as many set it where COGs are served, made GDAL's COG driver write no ``.aux.xml``:
    the COG was published without its category names and raster attribute table (QGIS's legend), without a word."""
    monkeypatch.setenv("GDAL_PAM_ENABLED", "NO")
    path = tmp_path / "mask.tif"
    layout = layout_for(GEO["shade.tif"], shade_labels, ("a", "b", "c", "d"), (512, 512), 255)
    drive(CogSink(str(path), layout), shade_labels)
    assert_only_finished(tmp_path, {"mask.tif", "mask.tif.aux.xml"})
    sidecar = (tmp_path / "mask.tif.aux.xml").read_text()
    assert "<Category>d</Category>" in sidecar and '<GDALRasterAttributeTable tableType="thematic">' in sidecar


def test_unwritable_folder_is_a_one_line_error(tmp_path, shade_labels):
    blocker = tmp_path / "file"
    blocker.write_text("")
    layout = layout_for(GEO["shade.tif"], shade_labels, ("a", "b", "c", "d"), (512, 512), 255)
    with pytest.raises(OutputError, match="cannot create"):
        CogSink(str(blocker / "mask.tif"), layout).create()


def test_pieces_are_replaced_atomically_on_retry(tmp_path, shade_labels):
    """A retried chunk task rewrites its piece; no temporary piece is left behind."""
    layout = layout_for(GEO["shade.tif"], shade_labels, ("a", "b", "c", "d"), (512, 512), 255)
    sink = CogSink(str(tmp_path / "mask.tif"), layout)
    sink.create()
    region = chunk_regions(layout.shape, layout.chunks)[0]
    write_chunk(sink, region, np.zeros_like(shade_labels), None)
    write_chunk(sink, region, shade_labels, None)
    assert [p.name for p in Path(sink.parts, "labels").iterdir()] == ["0_0.tif"]
    assert not any(name.endswith(".tmp") for _, _, names in os.walk(sink.parts) for name in names)
    sink.abort()


@pytest.mark.timeout(120)
def test_writing_pieces_from_many_threads_leaves_the_processs_warning_filters_as_they_were(tmp_path, shade_labels):
    """The workers of a ``LocalCluster(processes=False)`` are threads of the user's own process. Each piece was
    written inside ``warnings.catch_warnings()``, which saves and restores the process's filters: two threads in
    it at once left one's "ignore NotGeoreferencedWarning" in the user's process for good (seen after one
    2-scene run on such a client)."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    labels = shade_labels
    layout = layout_for(GEO["shade.tif"], labels, ["a", "b", "c", "d"], (32, 32), 255)
    sink = CogSink(str(tmp_path / "mask.tif"), layout)
    sink.create()
    before = list(warnings.filters)
    regions = chunk_regions(labels.shape, (32, 32))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda region: write_chunk(sink, region, labels, None), regions))
    assert warnings.filters == before, [f for f in warnings.filters if f not in before]
    sink.commit()
    with rasterio.open(tmp_path / "mask.tif") as ds:
        assert np.array_equal(ds.read(1), labels)


@pytest.mark.parametrize("output, why", [
    ({"path": "out/{stem}.tif"}, "output.path {tmp_path}/out/slice.tif: a COG holds a georeferenced 2D raster, and "
                                 "this input is placed by a volume's affine; write .zarr or .ome.zarr"),
    ({"vectors": "out/{stem}.gpkg"}, "output.vectors: polygons need a 2D georeferenced raster; this input is placed "
                                     "by a volume's affine; leave out output.vectors"),
], ids=["cog", "polygons"])  # fmt: skip
def test_a_2d_input_placed_by_a_volumes_affine_is_refused_a_cog_or_polygons_before_the_run(make_model, tmp_path,
                                                                                            client, output, why):
    """A 2D Zarr carrying an ``affine`` (a slice of a volume, as tilemask writes a volume's grid) has no raster
    georeferencing. Written to ``.tif`` it was refused when the COG was created as "a COG holds a 2D raster, this
    output is 2D" (exit 1), which says nothing of why; ``output.vectors`` was refused only after the whole run
    ("polygons need a 2D georeferenced label raster", exit 1), its labels left written. Both are refused when the
    input is planned (exit 2), saying why, nothing written."""
    import zarr

    import tilemask
    from tilemask import Workflow
    from tilemask.errors import InputError

    from .conftest import UNET_2D, raster_workflow

    image = zarr.open_array(tmp_path / "slice.zarr", mode="w", shape=(3, 96, 96), dtype="uint8", chunks=(3, 48, 48))
    image[:] = (np.random.default_rng(0).random((3, 96, 96)) * 255).astype(np.uint8)
    image.attrs["affine"] = [[0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]]
    weights, _ = make_model(UNET_2D)
    workflow = raster_workflow(tmp_path / "slice.zarr", weights, output=output)
    with pytest.raises(InputError) as refused:
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert str(refused.value) == f"{tmp_path}/slice.zarr: {why.format(tmp_path=tmp_path)}"
    assert refused.value.exit_status == 2
    assert not (tmp_path / "out").exists()


OVERVIEW_ENVIRONMENTS = {
    "compression": {"COMPRESS_OVERVIEW": "DEFLATE", "GDAL_TIFF_OVR_BLOCKSIZE": "128", "ZSTD_LEVEL_OVERVIEW": "1"},
    "float predictor": {"PREDICTOR_OVERVIEW": "3"},  # failed the labels COG: no floating point predictor on uint8
    "predictor, interleave": {"PREDICTOR_OVERVIEW": "2", "INTERLEAVE_OVERVIEW": "BAND"},
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("kind", "environment"), [(kind, environment) for environment in OVERVIEW_ENVIRONMENTS
                                                   for kind in ("uint8", "float32")
                                                   if kind == "uint8" or environment == "compression"])  # fmt: skip
def test_overviews_are_written_as_the_full_resolution_whatever_the_environment(tmp_path, shade_labels, monkeypatch,
                                                                                kind, environment):  # fmt: skip
    """GDAL's overview settings in the environment (``COMPRESS_OVERVIEW``, ``GDAL_TIFF_OVR_BLOCKSIZE``, ...) took
    precedence over what the COG driver derives from tilemask's creation options: the overviews of a labels COG
    came out deflate-compressed in 128 px tiles, where docs/outputs.md promises ZSTD in 512 px tiles.
    ``PREDICTOR_OVERVIEW=3`` failed the labels COG ("Floating point Predictor not supported with 1 data format"),
    ``PREDICTOR_OVERVIEW=2`` gave its overviews a predictor, ``INTERLEAVE_OVERVIEW=BAND`` the probabilities'
    overviews another interleave.  Not mended, so not tested: a float32 probabilities COG's overview predictor
    stays the environment's (pinning 3 fails its 8-bit mask's overviews, :func:`_overview_options`)."""
    for name, value in OVERVIEW_ENVIRONMENTS[environment].items():
        monkeypatch.setenv(name, value)
    classes = ("background", "dark", "mid", "bright")
    layout = layout_for(GEO["shade.tif"], shade_labels, classes, (512, 512), 255, kind)
    probabilities = one_hot(np.where(shade_labels == 255, 0, shade_labels), 4, kind)
    written = drive(CogSink(str(tmp_path / "mask.tif"), layout), shade_labels, probabilities)
    assert len(written) == 2
    for path in written:
        with rasterio.open(path) as full, rasterio.open(path, overview_level=0) as overview:
            assert full.overviews(1)
            seen = [(ds.compression, ds.block_shapes[0], ds.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR"),
                     ds.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE")) for ds in (full, overview)]  # fmt: skip
            assert seen[1] == seen[0], path
