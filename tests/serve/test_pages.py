"""The pages in a real headless Chromium (Debian's), asserting on the screenshot's pixels.

``/map`` must show each class in its colour where the label COG has it, and a
click must show the class; ``/view`` must show the scan in grey with the labels
over it in their class colours (NiiVue, WebGL2 through SwiftShader).
"""

from __future__ import annotations

import io
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer
from scipy import ndimage

from tilemask.classes import class_colours

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-quic", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
]  # fmt: skip
SIZE = {"width": 900, "height": 700}


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium"):
        pytest.fail("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


def open_page(browser, url):
    page = browser.new_page(viewport=SIZE, device_scale_factor=1)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_function("window.tilemaskReady === true || window.tilemaskError !== undefined", timeout=60_000)
    assert page.evaluate("window.tilemaskError") is None and not errors, errors
    return page


def screenshot(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)


def interior_pixels(labels: np.ndarray, value: int, n: int, seed: int = 0):
    """``n`` pixels of class ``value`` whose 9 x 9 neighbourhood is all that class (no edge ambiguity)."""
    solid = ndimage.binary_erosion(labels == value, np.ones((9, 9), bool))
    rows, cols = np.nonzero(solid)
    pick = np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False)
    return list(zip(rows[pick], cols[pick]))


@pytest.mark.slow  # Chromium's pixels are checked in the default run by the view below
def test_map_shows_each_class_in_its_colour_and_a_click_names_it(browser, server, served_folder):
    with rasterio.open(served_folder / "RGB.byte_mask.tif") as ds:
        labels = ds.read(1)
        names = json.loads(ds.tags()["TILEMASK_CLASSES"])
        to_lonlat = Transformer.from_crs(ds.crs, "OGC:CRS84", always_xy=True)
        xy = ds.xy
    colours = class_colours(len(names))
    page = open_page(browser, f"{server}map?output=RGB.byte_mask.tif")
    page.wait_for_timeout(500)
    shot = screenshot(page)
    legend = page.inner_text("#legend")
    assert "land" in legend and "cloud" in legend

    def on_screen(row, col):
        lon, lat = to_lonlat.transform(*xy(row, col))
        return page.evaluate(f"tilemaskMap.getPixelFromCoordinate(ol.proj.fromLonLat([{lon}, {lat}]))")

    panel = page.eval_on_selector(".panel", "e => e.getBoundingClientRect().toJSON()")
    for value in (1, 2):  # land, cloud (water, class 0, is the transparent background)
        hits = checked = 0
        for row, col in interior_pixels(labels, value, 60, seed=value):
            px, py = (int(round(v)) for v in on_screen(row, col))
            if not (0 <= px < SIZE["width"] and 0 <= py < SIZE["height"]) or (
                panel["left"] <= px <= panel["right"] and panel["top"] <= py <= panel["bottom"]
            ):
                continue
            checked += 1
            hits += np.abs(shot[py, px] - colours[value][:3]).max() <= 8
        assert checked >= 20 and hits / checked > 0.9, (names[value], hits, checked)
    Image.fromarray(shot.astype(np.uint8)).save(served_folder.parent / "map.png")

    row, col = interior_pixels(labels, 2, 1, seed=7)[0]
    px, py = on_screen(row, col)
    page.mouse.click(px, py)
    page.wait_for_function("document.getElementById('info').textContent.length > 0", timeout=30_000)
    assert page.inner_text("#info") == "cloud"
    page.close()


@pytest.mark.slow
def test_view_shows_the_scan_in_grey_with_the_labels_in_their_colours(browser, server, served_folder):
    labels = np.asarray(nib.load(served_folder / "anatomical_labels.nii.gz").dataobj)
    present = [int(v) for v in np.unique(labels) if v > 0]
    assert present, "the test network labelled nothing; the fixture must give the viewer something to show"
    page = open_page(browser, f"{server}view?volume=anatomical_labels.nii.gz")
    page.wait_for_timeout(1500)
    shot = screenshot(page)
    Image.fromarray(shot.astype(np.uint8)).save(served_folder.parent / "view.png")
    assert page.evaluate("tilemaskViewer.volumes.length") == 2  # the scan and the labels
    assert page.inner_text("#legend").split() == ["tissue"]  # from the labels' colour table (.colors.csv)
    grey = (np.ptp(shot, axis=-1) <= 3) & (shot[..., 0] > 40) & (shot[..., 0] < 230)
    assert grey.sum() > 2000, grey.sum()  # the scan, where the labels are background
    colours = class_colours(2)
    for value in present:
        near = np.all(np.abs(shot - colours[value][:3]) <= 40, axis=-1)
        assert near.sum() > 500, (value, near.sum())
    page.close()


@pytest.mark.slow
def test_map_says_nothing_of_tiles_outside_the_output_and_a_click_there_says_outside(browser, served_folder, tmp_path):
    """Tiles and clicks beyond the output are 404s the map knows by their ``X-Tilemask-Outside`` header (it read
    their text before): no error is named for the tiles, and a click there says "outside the outputs".  The mask
    alone is served: the served folder's three polygon layers, drawn zoomed out in software GL, took the VM 80-95 s."""
    from .conftest import start_server

    shutil.copyfile(served_folder / "RGB.byte_mask.tif", tmp_path / "RGB.byte_mask.tif")
    with start_server(tmp_path) as url:
        page = open_page(browser, f"{url}map?output=RGB.byte_mask.tif")
        outside = []
        page.on("response", lambda r: outside.append(r.url) if r.status == 404 and "/tiles/" in r.url else None)
        page.evaluate("new Promise(done => { tilemaskMap.once('rendercomplete', done); "
                      "tilemaskMap.getView().setZoom(tilemaskMap.getView().getZoom() - 2); })")  # fmt: skip
        assert outside and page.evaluate("window.tilemaskError") is None, outside
        page.mouse.click(20, SIZE["height"] - 20)  # a corner of the map, far from the scene
        page.wait_for_function("document.getElementById('info').textContent.length > 0", timeout=30_000)
        assert page.inner_text("#info") == "outside the outputs"
        page.close()


@pytest.mark.slow  # 21 s in a loaded default run (2026-12-07)
def test_map_of_one_output_is_zoomed_to_it_not_to_every_layer(browser, served_folder, tmp_path):
    """``/map?output=X`` (the index's link for X) fitted the view to X and to every polygons file in the folder:
    with a layer on another continent, X was a speck. Polygons are still drawn; the view is X's."""
    import geopandas as gpd
    from rasterio.warp import transform_bounds
    from shapely.geometry import box

    from .conftest import start_server

    shutil.copyfile(served_folder / "RGB.byte_mask.tif", tmp_path / "here_mask.tif")
    far = gpd.GeoDataFrame({"class": ["land"]}, geometry=[box(130, -26, 131, -25)], crs="OGC:CRS84")
    far.to_file(tmp_path / "australia.gpkg")
    with rasterio.open(tmp_path / "here_mask.tif") as ds:
        west, south, east, north = transform_bounds(ds.crs, "OGC:CRS84", *ds.bounds)
    with start_server(tmp_path) as url:
        for query, fills in (("?output=here_mask.tif", True), ("", False)):
            page = open_page(browser, f"{url}map{query}")
            corners = [page.evaluate(f"tilemaskMap.getPixelFromCoordinate(ol.proj.fromLonLat([{lon}, {lat}]))")
                       for lon, lat in ((west, north), (east, south))]  # fmt: skip
            page.close()
            (x0, y0), (x1, y1) = corners
            share = max((x1 - x0) / SIZE["width"], (y1 - y0) / SIZE["height"])
            assert (share > 0.7) == fills, (query, share)  # the whole folder's view: Landsat off Florida, a speck


@pytest.mark.slow
def test_map_shows_polygons_across_the_antimeridian_and_keeps_them_zoomed_out(browser, tmp_path):
    """The map fitted polygons across 180 degrees to an empty extent (a page error, no polygons), and a view
    wider than the world asked the features for a bbox past +-180 degrees (400: every polygon vanished). A
    second layer just west of 180 degrees (-179.7..-179.2) made the fitted view the whole world."""
    import geopandas as gpd
    from shapely.geometry import box

    from .conftest import start_server

    cells = [box(x, y, x + 9000, y + 9000) for x in range(0, 270000, 10000) for y in range(0, 200000, 10000)]
    layer = gpd.GeoDataFrame({"class": ["land"] * len(cells)}, geometry=cells, crs="EPSG:32601")  # 178.5E..179.2W
    layer.to_file(tmp_path / "cells.gpkg", driver="GPKG")
    layer.cx[200000:, :].to_file(tmp_path / "west_of_180.gpkg", driver="GPKG")  # listed after cells.gpkg
    with start_server(tmp_path) as url:
        page = browser.new_page(viewport=SIZE, device_scale_factor=1)
        errors, statuses = [], []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("response", lambda r: statuses.append(r.status) if "/items?" in r.url else None)
        page.goto(f"{url}map")
        page.wait_for_function("window.tilemaskReady === true", timeout=60_000)
        page.wait_for_timeout(500)
        assert not errors and statuses and set(statuses) == {200}, (errors, statuses)
        shot = screenshot(page)
        dark = np.all(np.abs(shot - 0x33) <= 12, axis=-1)  # the polygons' outline (#333, no class colours here)
        x180, _ = page.evaluate("tilemaskMap.getPixelFromCoordinate(ol.proj.fromLonLat([180, 0.6]))")
        assert 50 < x180 < SIZE["width"] - 50, x180  # the view holds both sides
        west, east = dark[:, : int(x180) - 3].sum(), dark[:, int(x180) + 3 :].sum()
        assert west > 2000 and east > 500, (west, east)  # 178.5E..180 and 180..179.2W: both drawn
        loaded = "tilemaskMap.getLayers().item(0).getSource().getFeatures().length"
        assert page.evaluate(loaded) == len(cells)
        page.evaluate("new Promise(done => { tilemaskMap.once('rendercomplete', done); "
                      "tilemaskMap.getView().setZoom(1); })")  # the world three times across the 900 pixels, drawn
        assert not errors and set(statuses) == {200}, (errors, statuses)
        assert page.evaluate(loaded) == len(cells)
        page.close()


@pytest.mark.slow  # 18 s: 10,500 polygons through OpenLayers
def test_map_loads_every_page_of_a_layer_of_more_features_than_a_page(browser, tmp_path):
    """The map asked for the features in view with limit=10000 and never followed the "next" link: every polygon
    after the first 10,000 was missing, and nothing said so."""
    import geopandas as gpd
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from shapely.geometry import box

    from .conftest import start_server

    cells = [box(x * 0.01, y * 0.01, x * 0.01 + 0.008, y * 0.01 + 0.008) for x in range(105) for y in range(100)]
    gpd.GeoDataFrame({"n": range(len(cells))}, geometry=cells, crs="OGC:CRS84").to_file(tmp_path / "cells.gpkg")
    with start_server(tmp_path) as url:
        page = browser.new_page(viewport=SIZE, device_scale_factor=1)
        errors, asked = [], []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("response", lambda r: asked.append((r.status, r.url)) if "/items" in r.url else None)
        page.goto(f"{url}map")
        loaded = "tilemaskMap.getLayers().item(0).getSource().getFeatures().length"
        try:
            page.wait_for_function(f"window.tilemaskReady === true && {loaded} >= {len(cells)}", timeout=60_000)
        except PlaywrightTimeout:
            pass  # the count below says how many came
        count = page.evaluate(f"window.tilemaskMap ? {loaded} : null")
        assert count == len(cells) == 10_500, count
        assert not errors and page.evaluate("window.tilemaskError") is None, errors
        assert {status for status, _ in asked} == {200} and any("offset=10000" in u for _, u in asked), asked
        page.close()


@pytest.mark.slow
def test_view_leaves_the_nodata_label_transparent(browser, served_folder, tmp_path):
    """NiiVue draws a value past its label colormap's last entry in that entry's colour: the voxels tilemask labels
    255 (nodata: the scan's invalid voxels) were drawn as the last class, tissue, over the scan, where the map
    leaves them transparent. Half the volume made nodata must show less of the class colour, not more."""
    from tilemask.formats import nifti_descrip

    from .conftest import start_server

    (tmp_path / "whole").mkdir()
    (tmp_path / "half").mkdir()
    img = nib.load(served_folder / "anatomical_labels.nii.gz")
    labels = np.asarray(img.dataobj)
    assert labels.max() == 1 and (labels[:, :, 12:] == 1).sum() > 1000
    invalid = labels.copy()
    invalid[:, :, :12] = 255  # the lower half invalid, as tilemask labels voxels whose scan was not finite
    header = img.header.copy()
    header["descrip"], header["cal_max"] = nifti_descrip(255), 255  # as tilemask's writer records nodata
    for folder, data in (("whole", labels), ("half", invalid)):
        for name in ("anatomical.nii", "anatomical_labels.colors.csv"):
            shutil.copyfile(served_folder / name, tmp_path / folder / name)
        nib.save(nib.Nifti1Image(data, img.affine, header), tmp_path / folder / "anatomical_labels.nii.gz")
    tinted = {}
    for folder in ("whole", "half"):
        with start_server(tmp_path / folder) as url:
            page = open_page(browser, f"{url}view?volume=anatomical_labels.nii.gz")
            page.wait_for_timeout(1500)
            shot = screenshot(page)
            Image.fromarray(shot.astype(np.uint8)).save(tmp_path / f"view_{folder}.png")
            page.close()
        tinted[folder] = int(((shot[..., 2] - shot[..., 0]) > 40).sum())  # the class colour (blue) over the grey
    assert 500 < tinted["half"] < 0.8 * tinted["whole"], tinted


@pytest.mark.slow
def test_a_click_names_the_class_of_the_output_drawn_on_top(browser, served_folder, tmp_path):
    """With two outputs over the same place, the map draws the second over the first but a click asked the first
    and named its class: a pixel drawn as cloud was named land. Where the top one has no data (transparent), the
    click names the class of the one below."""
    from rasterio.enums import Resampling as Resample

    from .conftest import start_server

    for name in ("a_mask.tif", "b_mask.tif"):  # listed, and drawn, in this order: b on top
        shutil.copyfile(served_folder / "RGB.byte_mask.tif", tmp_path / name)
        shutil.copyfile(served_folder / "RGB.byte_mask.tif.aux.xml", tmp_path / f"{name}.aux.xml")
    with rasterio.open(tmp_path / "b_mask.tif", "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
        labels = ds.read(1)
        names = json.loads(ds.tags()["TILEMASK_CLASSES"])
        top = np.full_like(labels, 255)  # nodata below the middle row
        top[: labels.shape[0] // 2] = names.index("cloud")  # cloud above it
        ds.write(top, 1)
        ds.build_overviews([2], Resample.mode)
        to_lonlat = Transformer.from_crs(ds.crs, "OGC:CRS84", always_xy=True)
        xy = ds.xy
    land = [(r, c) for r, c in interior_pixels(labels, names.index("land"), 400, seed=3)]
    above = next((r, c) for r, c in land if r < labels.shape[0] // 2 - 10)
    below = next((r, c) for r, c in land if r > labels.shape[0] // 2 + 10)
    colours = class_colours(len(names))
    with start_server(tmp_path) as url:
        page = open_page(browser, f"{url}map")
        page.wait_for_timeout(500)
        shot = screenshot(page)
        for (row, col), name in ((above, "cloud"), (below, "land")):
            lon, lat = to_lonlat.transform(*xy(row, col))
            px, py = page.evaluate(f"tilemaskMap.getPixelFromCoordinate(ol.proj.fromLonLat([{lon}, {lat}]))")
            drawn = shot[int(round(py)), int(round(px))]
            assert np.abs(drawn - colours[names.index(name)][:3]).max() <= 8, (name, drawn)  # what is seen there
            page.evaluate("document.getElementById('info').textContent = ''")
            page.mouse.click(px, py)
            page.wait_for_function("document.getElementById('info').textContent.length > 0", timeout=30_000)
            assert page.inner_text("#info") == name
        page.close()


@pytest.mark.slow
def test_map_names_an_output_whose_tiles_cannot_be_read(browser, served_folder, tmp_path):
    """A label COG cut short: its header reads, so the catalog lists it and the map asks for its tiles, and those
    past the cut were 422s the page left as gaps without a word. The page names the file and GDAL's reason, and
    still draws the tiles that read."""
    from .conftest import start_server

    whole = (served_folder / "RGB.byte_mask.tif").read_bytes()
    (tmp_path / "cut_mask.tif").write_bytes(whole[: len(whole) * 9 // 10])  # its last tiles cut
    shutil.copyfile(served_folder / "RGB.byte_mask.tif.aux.xml", tmp_path / "cut_mask.tif.aux.xml")
    with start_server(tmp_path) as url:
        page = browser.new_page(viewport=SIZE, device_scale_factor=1)
        page.goto(f"{url}map?output=cut_mask.tif")
        page.wait_for_function("window.tilemaskError !== undefined", timeout=60_000)
        error = page.evaluate("window.tilemaskError")
        assert error.startswith("cut_mask.tif: cannot read: "), error  # GDAL's reason for one of the tiles
        assert page.inner_text("#info").startswith("not all tiles drawn: cut_mask.tif: cannot read: ")
        page.wait_for_function("window.tilemaskReady === true", timeout=60_000)
        page.wait_for_timeout(500)
        shot = screenshot(page)
        page.close()
    with rasterio.open(served_folder / "RGB.byte_mask.tif") as ds:
        names = json.loads(ds.tags()["TILEMASK_CLASSES"])
    colours = class_colours(len(names))
    land = int((np.abs(shot - colours[1][:3]).max(axis=2) <= 8).sum())
    assert land > 1000, land  # from the tiles before the cut


@pytest.mark.slow
def test_the_maps_legend_names_the_outputs_of_a_class_drawn_in_two_colours(browser, served_folder, tmp_path):
    """Two outputs naming their classes in another order draw "land" in two colours, but the legend, merged by
    class name, showed one swatch for it: the other output's land looked like its cloud. A name drawn in two
    colours is now a row per colour naming its outputs, each swatch in the colour the tiles use."""
    from tilemask.sources.labels import open_labels

    from .conftest import start_server

    for name in ("a_mask.tif", "b_mask.tif"):
        shutil.copyfile(served_folder / "RGB.byte_mask.tif", tmp_path / name)
        shutil.copyfile(served_folder / "RGB.byte_mask.tif.aux.xml", tmp_path / f"{name}.aux.xml")
    with rasterio.open(served_folder / "RGB.byte_mask.tif") as ds:
        names = json.loads(ds.tags()["TILEMASK_CLASSES"])
    assert len(names) == 3, names
    swapped = [names[0], names[2], names[1]]
    with rasterio.open(tmp_path / "b_mask.tif", "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
        ds.update_tags(TILEMASK_CLASSES=json.dumps(swapped))
    assert open_labels(str(tmp_path / "b_mask.tif")).class_names == tuple(swapped)
    colours = class_colours(3)
    expected = {
        f"{names[1]} (a_mask.tif)": colours[1], f"{names[2]} (a_mask.tif)": colours[2],
        f"{names[2]} (b_mask.tif)": colours[1], f"{names[1]} (b_mask.tif)": colours[2],
    }  # fmt: skip
    with start_server(tmp_path) as url:
        page = open_page(browser, f"{url}map")
        rows = page.eval_on_selector_all(
            "#legend > div", "rows => rows.map(r => [r.textContent, r.firstChild.getBoundingClientRect().toJSON()])"
        )
        shot = screenshot(page)
        page.close()
    assert sorted(text for text, _ in rows) == sorted(expected), rows
    for text, box in rows:
        drawn = shot[int(box["y"] + box["height"] / 2), int(box["x"] + box["width"] / 2)]
        assert np.abs(drawn - expected[text][:3]).max() <= 8, (text, drawn, expected[text])


@pytest.mark.slow
def test_map_names_an_output_removed_while_open_and_a_long_legend_scrolls_in_its_panel(browser, served_folder,
                                                                                        tmp_path):
    """A reviewer's: once a label COG was removed, the map's tiles of it were 404s the page took for tiles outside
    the output (no word), and a click there said "outside the outputs". Both name the file now. A legend of 300
    classes made the page itself scroll, the map out of sight; it scrolls inside its panel."""
    from .conftest import start_server

    for name in ("gone_mask.tif", "many_mask.tif"):
        shutil.copyfile(served_folder / "RGB.byte_mask.tif", tmp_path / name)
        shutil.copyfile(served_folder / "RGB.byte_mask.tif.aux.xml", tmp_path / f"{name}.aux.xml")
    with rasterio.open(tmp_path / "many_mask.tif", "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
        ds.update_tags(TILEMASK_CLASSES=json.dumps([f"class{v}" for v in range(300)]))
    with start_server(tmp_path) as url:
        page = browser.new_page(viewport=SIZE, device_scale_factor=1)
        failed = []
        page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
        page.goto(f"{url}map?output=many_mask.tif")
        page.wait_for_function("window.tilemaskReady === true", timeout=60_000)
        assert failed == [], failed
        panel = page.evaluate("(() => { const p = document.querySelector('.panel'); return [p.scrollHeight, "
                              "p.clientHeight, document.scrollingElement.scrollHeight, innerHeight]; })()")
        assert panel[0] > panel[1] and panel[2] <= panel[3], panel  # the legend scrolls, the page does not
        page.close()

        page = open_page(browser, f"{url}map?output=gone_mask.tif")
        (tmp_path / "gone_mask.tif").unlink()
        page.evaluate("tilemaskMap.getView().setZoom(tilemaskMap.getView().getZoom() + 1)")
        page.wait_for_function("window.tilemaskError !== undefined", timeout=60_000)
        assert "gone_mask.tif" in page.evaluate("window.tilemaskError")
        page.mouse.click(SIZE["width"] // 2, SIZE["height"] // 2)
        page.wait_for_function("document.getElementById('info').textContent.includes('gone_mask.tif') && "
                               "!document.getElementById('info').textContent.startsWith('not all tiles')",
                               timeout=30_000)  # fmt: skip
        said = page.inner_text("#info")
        page.close()
    assert said.startswith("not found") or "not a labels" in said, said


@pytest.mark.slow
def test_view_draws_labels_whose_values_pass_the_gpus_largest_texture(browser, tmp_path):
    """A reviewer's: labels naming a value of 14175 (FreeSurfer's greatest) or 1e6 showed the scan alone: NiiVue's
    label colormap, a texel per value up to the greatest, was past the GPU's largest texture (8192 here), and the
    page said nothing. Both classes are drawn over the scan as labels of small values are: as many pixels differ
    from the scan drawn under labels of background alone."""
    from tilemask.formats import NIFTI_DESCRIP

    from .conftest import start_server

    scan = np.full((40, 40, 40), 300, np.int16)
    scan[::2] += 200
    shots = {}
    for top in (0, 2, 14175, 1_000_000):
        folder = tmp_path / str(top)
        folder.mkdir()
        labels = np.zeros((40, 40, 40), np.int32)
        if top:
            labels[5:18, 5:35], labels[22:35, 5:35] = 1, top
        nib.save(nib.Nifti1Image(scan, np.eye(4)), folder / "m.nii.gz")
        img = nib.Nifti1Image(labels, np.eye(4))
        img.header["descrip"] = NIFTI_DESCRIP
        nib.save(img, folder / "m_labels.nii.gz")
        (folder / "m_labels.colors.csv").write_text("LabelValue,Name,Color_R,Color_G,Color_B,Color_A\n"
                                                    "0,background,0,0,0,0\n1,liver,31,119,180,255\n"
                                                    f"{top or 2},lesion,214,39,40,255\n")  # fmt: skip
        with start_server(folder) as url:
            page = open_page(browser, f"{url}view?volume=m_labels.nii.gz")
            page.wait_for_timeout(1500)
            shots[top] = screenshot(page)[:, :780]  # left of the legend
            page.close()
    drawn = {top: int((np.abs(shot - shots[0]).max(axis=2) > 25).sum()) for top, shot in shots.items() if top}
    assert drawn[2] > 20_000, drawn
    assert all(abs(n - drawn[2]) < 0.25 * drawn[2] for n in drawn.values()), drawn
