"""Quick look PNG: thumbnail size, class colours over the stretched input, nodata transparent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.enums import Resampling

from tilemask.classes import class_colours
from tilemask.errors import InputError, ReadError
from tilemask.geometry import RasterGeometry
from tilemask.quicklook import thumbnail_shape, write_quicklook
from tilemask.sinks import OutputLayout
from tilemask.sinks.cog import CogSink

from .conftest import GEO, band_vrt


def write_labels_cog(path: Path, reference: Path, labels: np.ndarray, nodata: int | None) -> str:
    with rasterio.open(reference) as src:
        geometry = RasterGeometry(src.crs.to_wkt(), tuple(src.transform.to_gdal()))
    layout = OutputLayout(labels.shape, (256, 256), ("background", "water", "land"), "uint8", 0, "none",
                          geometry, str(reference), nodata)  # fmt: skip
    sink = CogSink(str(path), layout)
    sink.create()
    h, w = labels.shape
    for r in range(0, h, 256):
        for c in range(0, w, 256):
            sink.write(((r, min(r + 256, h)), (c, min(c + 256, w))), labels[r : r + 256, c : c + 256], None)
    sink.commit()
    return str(path)


def shown(path: Path, bands: list[int], shape: tuple[int, int]) -> np.ndarray:
    """The input as a quick look shows it: the bands read at ``shape`` (nearest), each stretched between
    the 2nd and 98th percentiles of its valid pixels to 0..255 and rounded; ``(h, w, 3)`` floats."""
    with rasterio.open(path) as src:
        image = src.read(bands, out_shape=(len(bands), *shape), masked=True, resampling=Resampling.nearest)
    out = []
    for band in image:
        lo, hi = np.percentile(band.compressed().astype(np.float64), (2, 98))
        out.append(np.rint(np.clip((band.filled(lo) - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255)))
    return np.dstack((out * 3)[:3])


@pytest.fixture()
def shade_case(tmp_path):
    with rasterio.open(GEO["shade.tif"]) as src:
        data = src.read(1)
    cols = np.arange(data.shape[1])[None, :].repeat(data.shape[0], 0)
    labels = (cols * 3 // data.shape[1]).astype(np.uint8)  # thirds: background, water, land
    labels[data == 255] = 255
    return write_labels_cog(tmp_path / "mask.tif", GEO["shade.tif"], labels, 255), labels


def test_thumbnail_shape():
    assert thumbnail_shape((32768, 16384), 1024) == (1024, 512)
    assert thumbnail_shape((300, 200), 1024) == (300, 200)


def test_quicklook_of_grey_input_with_nodata(tmp_path, shade_case):
    mask, labels = shade_case
    png = write_quicklook(str(GEO["shade.tif"]), mask, str(tmp_path / "look.png"), size=256)
    assert png == str(tmp_path / "look.png")
    image = np.asarray(Image.open(png))
    assert image.shape == (256, 256, 4)
    with rasterio.open(mask) as ds, rasterio.open(GEO["shade.tif"]) as src:  # the same reduced reads
        small = ds.read(1, out_shape=(256, 256))
        invalid = src.read(1, out_shape=(256, 256), masked=True).mask
    assert abs(np.mean(small == 1) - np.mean(labels == 1)) < 0.02
    assert (alpha := image[..., 3]).any()
    alpha = image[..., 3]
    assert np.array_equal(alpha == 0, invalid | (small == 255))
    water = np.array(class_colours(3)[1][:3])
    rgb = image[..., :3].astype(int)
    visible = alpha == 255
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    background, tinted = visible & (small == 0), visible & (small == 1)
    assert background.sum() > 1000 and tinted.sum() > 1000
    assert grey[background].all()  # background shows the (grey) image as is
    # the hillshade's valid pixels are all 0 at this size, so water shows exactly half its colour
    image_shown = shown(GEO["shade.tif"], [1], (256, 256))
    assert np.array_equal(rgb[background], image_shown[background])
    assert np.array_equal(rgb[tinted], np.rint(0.5 * image_shown[tinted] + 0.5 * water))
    assert not grey[tinted].any()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_quicklook_of_rgb_input(tmp_path):
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        labels = (src.read(1) > 100).astype(np.uint8)
    mask = write_labels_cog(tmp_path / "mask.tif", GEO["RGB.byte.tif"], labels, None)
    png = write_quicklook(str(GEO["RGB.byte.tif"]), mask, str(tmp_path / "q" / "look.png"), bands=[3, 2, 1], size=400)
    image = Image.open(png)
    assert image.size == (400, 363) and image.mode == "RGBA"
    image = np.asarray(image).astype(int)
    with rasterio.open(mask) as ds, rasterio.open(GEO["RGB.byte.tif"]) as src:  # the same reduced reads
        small = ds.read(1, out_shape=(363, 400))
        invalid = src.read([3, 2, 1], out_shape=(3, 363, 400), masked=True).mask.all(axis=0)
    assert np.array_equal(image[..., 3] == 0, invalid)  # nodata in every band (GDAL's dataset mask) is transparent
    expected = shown(GEO["RGB.byte.tif"], [3, 2, 1], (363, 400))
    water = np.array(class_colours(2)[1][:3])
    expected[small == 1] = np.rint(0.5 * expected[small == 1] + 0.5 * water)  # bright pixels: half water colour
    visible = ~invalid
    assert (visible & (small == 0)).sum() > 5000 and (visible & (small == 1)).sum() > 5000
    assert np.abs(image[..., :3][visible] - expected[visible]).max() <= 1


def test_labels_on_another_grid_are_refused(tmp_path, shade_case):
    mask, _ = shade_case
    with pytest.raises(InputError, match="not on its grid"):
        write_quicklook(str(GEO["RGB.byte.tif"]), mask, str(tmp_path / "look.png"))
    assert not (tmp_path / "look.png").exists()


def test_a_pixel_with_nodata_in_one_band_only_is_shown(tmp_path):
    """GDAL's dataset mask (and so tilemask's labels) takes a pixel as valid unless every band is nodata; the quick
    look made it transparent where any band was (710 labelled pixels of the demo scene)."""
    data = np.full((3, 64, 80), 120, np.uint8)
    data[0, :, :20] = 0  # band 1 at the nodata value only
    data[:, :, 60:] = 0  # every band: nodata
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=80, height=64, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32618", transform=rasterio.transform.from_origin(500000, 4000000, 30, 30)) as ds:  # fmt: skip
        ds.write(data)
    with rasterio.open(scene) as ds:
        dataset_mask = ds.dataset_mask() > 0
    labels = np.where(dataset_mask, 1, 255).astype(np.uint8)
    png = write_quicklook(str(scene), write_labels_cog(tmp_path / "mask.tif", scene, labels, 255), str(tmp_path / "q.png"))
    alpha = np.asarray(Image.open(png))[..., 3]
    assert alpha.shape == dataset_mask.shape
    np.testing.assert_array_equal(alpha > 0, dataset_mask)
    assert (alpha[:, :20] == 255).all()


def test_non_finite_pixels_are_invalid_as_nodata_is(tmp_path):
    """A float32 scene marking nodata with NaN (no nodata value) gave a black quick look: the percentiles of its
    bands were NaN. It must show as the same scene in uint8 with its nodata value does."""
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        data, valid, profile = src.read(), src.dataset_mask() > 0, src.profile
    scene = tmp_path / "float.tif"
    profile.update(dtype="float32", nodata=None)
    with rasterio.open(scene, "w", **profile) as ds:
        ds.write(np.where(valid, data, np.nan).astype(np.float32))
    labels = np.where(valid, (data[0] > 100).astype(np.uint8), 255).astype(np.uint8)
    mask = write_labels_cog(tmp_path / "mask.tif", GEO["RGB.byte.tif"], labels, 255)
    looks = [np.asarray(Image.open(write_quicklook(str(source), mask, str(tmp_path / f"{i}.png"), size=400)))
             for i, source in enumerate((GEO["RGB.byte.tif"], scene))]  # fmt: skip
    assert looks[0][..., :3].max() == 255 and (looks[0][..., 3] == 0).any()
    np.testing.assert_array_equal(looks[1], looks[0])


@pytest.mark.timeout(60)
def test_the_quick_look_carries_tilemasks_mark_and_other_pngs_do_not(tmp_path, shade_case):
    """A quick look's ``Software`` text chunk says tilemask wrote it, read back without its pixels: ``--overwrite``
    replaces no other PNG (one Pillow wrote, one another program marked as its own, a JPEG named .png, noise)."""
    from PIL.PngImagePlugin import PngInfo

    from tilemask.formats import product_written_by_tilemask

    mask, _ = shade_case
    png = write_quicklook(str(GEO["shade.tif"]), mask, str(tmp_path / "look.png"), size=128)
    with Image.open(png) as image:
        assert image.info["Software"].startswith("tilemask ") and image.size == (128, 128)
    assert product_written_by_tilemask(png) is True
    pixels = Image.fromarray(np.zeros((20, 30, 4), np.uint8), "RGBA")
    pixels.save(tmp_path / "plain.png")
    other = PngInfo()
    other.add_text("Software", "GIMP 2.10")
    pixels.save(tmp_path / "gimp.png", pnginfo=other)
    pixels.convert("RGB").save(tmp_path / "photo.png", format="JPEG")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(3000))
    for name in ("plain.png", "gimp.png", "photo.png", "noise.png"):
        assert product_written_by_tilemask(tmp_path / name) is False, name


@pytest.mark.timeout(30)
def test_a_vrt_of_bands_of_several_types_is_shown(tmp_path):
    """A reviewer's: a VRT stacking uint8 bands and a float32 one ran, wrote its labels and polygons, then failed
    the quick look (``ValueError: more than one 'dtype' found``, exit 1). Shown as the same bands in one type are."""
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        data, profile = src.read(), src.profile
    profile.update(dtype="float32", count=1, nodata=None)  # the VRT's bands say no nodata value
    with rasterio.open(tmp_path / "blue.tif", "w", **profile) as ds:
        ds.write(data[2:].astype(np.float32))
    profile.update(count=3)
    with rasterio.open(tmp_path / "same.tif", "w", **profile) as ds:
        ds.write(data.astype(np.float32))
    width, height = data.shape[2], data.shape[1]
    scene = str(GEO["RGB.byte.tif"])
    mixed = band_vrt(tmp_path / "mixed.vrt", [(scene, "Byte", 1), (scene, "Byte", 2), ("blue.tif", "Float32", 1)],
                     width, height)  # fmt: skip
    labels = (data[0] > 100).astype(np.uint8)
    mask = write_labels_cog(tmp_path / "mask.tif", GEO["RGB.byte.tif"], labels, None)
    looks = [np.asarray(Image.open(write_quicklook(str(source), mask, str(tmp_path / f"{i}.png"), size=300)))
             for i, source in enumerate((tmp_path / "same.tif", mixed))]  # fmt: skip
    assert looks[0][..., :3].max() == 255
    np.testing.assert_array_equal(looks[1], looks[0])


def overviews_cut_short(scene, size: int, factors: list[int]):
    """A tiled GeoTIFF of ``size``^2 random pixels, overviews appended (``gdaladdo``), cut short in its last
    overview's last tile; returns (path, pixels)."""
    data = (np.random.default_rng(0).random((3, size, size)) * 255).astype(np.uint8)
    grid = dict(crs="EPSG:32618", transform=rasterio.transform.from_origin(500000, 4000000, 30, 30))
    with rasterio.open(scene, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True,
                       **grid) as ds:  # fmt: skip
        ds.write(data)
    with rasterio.open(scene, "r+") as ds:
        ds.build_overviews(factors, Resampling.average)
    with open(scene, "r+b") as f:
        f.truncate(scene.stat().st_size - 2000)
    return scene, data


def test_an_input_whose_overviews_are_cut_short_fails_the_quick_look_in_gdals_words_exit_1(tmp_path):
    """A GeoTIFF with overviews appended (``gdaladdo``) and cut short in them: the run reads its pixels whole, and the
    quick look, which reads an overview, failed ``InputError`` (exit 2, after the run) ``cannot read: Read failed.
    See previous exception for details.``, rasterio's words without GDAL's."""
    scene, data = overviews_cut_short(tmp_path / "scene.tif", 1024, [2, 4, 8])
    with rasterio.open(scene) as ds:
        assert np.array_equal(ds.read(), data)  # what the run reads is whole
    labels = write_labels_cog(tmp_path / "labels.tif", scene, (data[0] > 127).astype(np.uint8), None)
    why = r"TIFFReadEncodedTile:.*got \d+ bytes, expected \d+$"
    with pytest.raises(ReadError, match=rf"^{scene}: cannot read for the quick look: {why}") as failed:
        write_quicklook(str(scene), labels, str(tmp_path / "look.png"), size=128)
    assert failed.value.exit_status == 1
    assert not (tmp_path / "look.png").exists()


@pytest.mark.slow  # 49 s in a loaded default run (2026-12-07)
def test_a_run_whose_quick_look_fails_warns_and_keeps_its_labels_as_the_item_ok(make_model, write_workflow, tmp_path):
    """A scene whose overviews are cut short (the run reads its pixels whole): its labels COG was published, and the
    item recorded failed for the quick look (exit 1) though the labels stood as finished; ``--retry-failed`` redid
    it whole, to fail again. The quick look is a picture beside the product: a warning, the item ok, exit 0."""
    import csv

    from .conftest import UNET_2D, raster_workflow, run_cli

    scene, _ = overviews_cut_short(tmp_path / "scene.tif", 2048, [2])  # the 1024 px quick look reads the overview
    weights, _ = make_model(UNET_2D)
    workflow = raster_workflow(scene, weights, output={"path": "out/{stem}_mask.tif", "probabilities": "none", "chunks": 1024},
                               inference={"roi_size": [512, 512], "overlap": 0.0})  # fmt: skip
    done = run_cli("run", write_workflow(workflow), "--workers", "1", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"WARNING tilemask.products: no quick look {tmp_path}/out/scene_mask.png: {scene}: "
                                  "cannot read for the quick look: TIFFReadEncodedTile")  # fmt: skip
    assert not (tmp_path / "out" / "scene_mask.png").exists()
    with rasterio.open(tmp_path / "out" / "scene_mask.tif") as ds:
        assert ds.shape == (2048, 2048)
    (report,) = (tmp_path / "out" / ".tilemask" / "jobs").glob("*/report.csv")
    with open(report, newline="") as f:
        (row,) = csv.DictReader(f)
    assert (row["status"], row["outputs"]) == ("ok", f"{tmp_path}/out/scene_mask.tif")
    again = run_cli("run", write_workflow(workflow), "--workers", "1", "--quiet", cwd=tmp_path)
    assert again.returncode == 0 and again.stderr == ""  # resumed: skipped, not redone


@pytest.mark.parametrize("stored", ["south-up", "east-left", "no transform"])
def test_a_raster_stored_south_up_or_east_left_is_shown_north_up(tmp_path, stored):
    """A georeferenced raster stored south-up (rows running north, its transform's row step positive) showed
    upside down, and one stored east-left mirrored: its quick look is now the north-up original's, pixel for pixel
    (full size: no resampling). A raster with a CRS and no transform (GDAL's identity) is shown as stored."""
    import warnings

    from affine import Affine
    from rasterio.errors import NotGeoreferencedWarning

    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        data, profile, t = src.read(), src.profile, src.transform
    h, w = data.shape[1:]
    transform, pixels = {
        "south-up": (Affine(t.a, 0, t.c, 0, -t.e, t.f + t.e * h), data[:, ::-1]),
        "east-left": (Affine(-t.a, 0, t.c + t.a * w, 0, t.e, t.f), data[:, :, ::-1]),
        "no transform": (Affine.identity(), data),
    }[stored]
    profile.update(transform=transform)
    flipped = tmp_path / "stored.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(flipped, "w", **profile) as dst:
            dst.write(pixels)
        pngs = []
        for path in (GEO["RGB.byte.tif"], flipped):
            with rasterio.open(path) as src:
                labels = (src.read(1) > 100).astype(np.uint8)
            mask = write_labels_cog(tmp_path / f"{Path(path).stem}_mask.tif", path, labels, None)
            png = write_quicklook(str(path), mask, str(tmp_path / f"{Path(path).stem}.png"), bands=[3, 2, 1], size=1024)
            pngs.append(np.asarray(Image.open(png)))
    assert pngs[0].shape == (h, w, 4) == (718, 791, 4)
    assert np.array_equal(pngs[1], pngs[0])
