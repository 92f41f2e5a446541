"""Earth observation end to end: real rasters, nodata, COG through the engine, remote reads."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import rasterio
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

import tilemask
from tilemask import Workflow
from tilemask.sources import open_source

from .conftest import GEO, raster_workflow, run_cli
from .range_server import RangeHandler, serve

ONE_BAND = dict(spatial_dims=2, in_channels=1, out_channels=3, channels=[8, 16, 32], strides=[2, 2], num_res_units=1)
THREE_BANDS = {**ONE_BAND, "in_channels": 3}


def monai_labels(image, valid, net, mean, std, roi=64):
    """MONAI on the normalized full image, invalid pixels set to 0 (tilemask's documented rule)."""
    x = (image.astype(np.float32) - np.float32(mean).reshape(-1, 1, 1)) / np.float32(std).reshape(-1, 1, 1)
    x[:, ~valid] = 0.0
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(x[None]), (roi, roi), 4, net, overlap=0.25, mode="gaussian")
    probs = torch.softmax(logits, 1)[0].numpy()
    return probs


def run_workflow(tmp_path, client, input_path, args, weights, mean, std, **output):
    wf = Workflow.from_dict(
        {
            "version": 1,
            "input": str(input_path),
            "classes": ["background", "water", "cloud"],
            "model": {"network": "UNet", "args": args, "weights": str(weights)},
            "preprocess": {"normalize": {"mean": mean, "std": std}},
            "inference": {"roi_size": [64, 64], "overlap": 0.25, "batch_size": 4, "device": "cpu"},
            "output": {"path": "out/{stem}_mask.tif", "chunks": 192, "probabilities": "uint8", **output},
        },
        base_dir=tmp_path,
    )
    (result,) = tilemask.run(wf, client)
    return result


def assert_labels_match(labels, probs, valid, nodata):
    expected = probs.argmax(0)
    top2 = np.sort(probs, axis=0)[-2:]
    assert np.all(labels[~valid] == nodata), "nodata not carried exactly"
    agree = (labels == expected) | (top2[1] - top2[0] < 1e-4)
    assert np.all(agree[valid])


def assert_cog_like_input(path, source):
    assert cog_validate(str(path), strict=True)[0], cog_validate(str(path), strict=True)
    with rasterio.open(path) as out, rasterio.open(source) as src:
        assert out.crs == src.crs and out.transform == src.transform
        assert (out.width, out.height) == (src.width, src.height)
        if max(out.width, out.height) > 512:
            assert out.overviews(1), "no overviews"
        return out.nodata


@pytest.fixture
def seeded_net(tmp_path):
    def make(args):
        torch.manual_seed(3)
        net = UNet(**args).eval()
        path = tmp_path / "net.pt"
        torch.save(net.state_dict(), path)
        return path, net

    return make


@pytest.mark.slow  # 6 s; the default run keeps the Landsat COG against MONAI
def test_shade_nodata_is_carried_pixel_for_pixel(tmp_path, client, seeded_net):
    source = GEO["shade.tif"]  # real hillshade, EPSG:3857, nodata 255
    weights, net = seeded_net(ONE_BAND)
    result = run_workflow(tmp_path, client, source, ONE_BAND, weights, [150.0], [60.0], vectors="out/{stem}.gpkg")
    labels_path = result.outputs[0]
    nodata = assert_cog_like_input(labels_path, source)
    with rasterio.open(source) as src:
        image, valid = src.read(), src.dataset_mask() > 0
    assert (~valid).sum() > 1000 and nodata == 255
    with rasterio.open(labels_path) as out:
        labels = out.read(1)
        overview = out.read(1, out_shape=(out.height // 2, out.width // 2))
    assert_labels_match(labels, monai_labels(image, valid, net, [150.0], [60.0]), valid, nodata)
    assert set(np.unique(overview)) <= {0, 1, 2, 255}, "overview pixels must be classes or nodata"
    assert result.class_pixels["background"] + result.class_pixels["water"] + result.class_pixels["cloud"] == valid.sum()
    assert any(p.endswith(".gpkg") for p in result.outputs) and any(p.endswith(".png") for p in result.outputs)


def test_rgb_landsat_cog(tmp_path, client, seeded_net):
    source = GEO["RGB.byte.tif"]  # real Landsat 7 RGB, nodata 0
    weights, net = seeded_net(THREE_BANDS)
    mean, std = [40.0, 50.0, 55.0], [25.0, 25.0, 30.0]
    result = run_workflow(tmp_path, client, source, THREE_BANDS, weights, mean, std)
    nodata = assert_cog_like_input(result.outputs[0], source)
    assert cog_validate(result.outputs[1], strict=True)[0]  # probabilities COG
    with rasterio.open(source) as src:
        image, valid = src.read(), src.dataset_mask() > 0
    with rasterio.open(result.outputs[0]) as out:
        labels = out.read(1)
    assert_labels_match(labels, monai_labels(image, valid, net, mean, std), valid, nodata)


def test_band_selection_scale_offset_and_geographic_crs(tmp_path, client, seeded_net):
    """Bands picked in the asked order; scale/offset tags applied; a geographic CRS kept."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 4000, (4, 150, 170)).astype("uint16")
    path = tmp_path / "geo.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=170, height=150, count=4, dtype="uint16", crs="EPSG:4326",
        transform=from_origin(-3.0, 52.0, 0.001, 0.001), nodata=0,
    ) as ds:
        ds.write(data)
        ds.scales = (0.0001, 0.0001, 0.0001, 0.0001)
        ds.offsets = (-0.1, -0.1, -0.1, -0.1)
    weights, net = seeded_net(THREE_BANDS)
    wf = Workflow.from_dict(
        {
            "version": 1, "input": str(path),
            "model": {"network": "UNet", "args": THREE_BANDS, "weights": str(weights)},
            "preprocess": {"bands": [4, 1, 2], "normalize": {"mean": [0.1] * 3, "std": [0.1] * 3}},
            "inference": {"roi_size": [64, 64], "batch_size": 4, "device": "cpu"},
            "output": {"path": "out/geo.tif", "chunks": 64},
        },
        base_dir=tmp_path,
    )  # fmt: skip
    (result,) = tilemask.run(wf, client)
    assert_cog_like_input(result.outputs[0], path)
    reflectance = data[[3, 0, 1]] * np.float32(0.0001) + np.float32(-0.1)
    valid = data.any(axis=0)
    with rasterio.open(result.outputs[0]) as out:
        labels = out.read(1)
    assert_labels_match(labels, monai_labels(reflectance, valid, net, [0.1] * 3, [0.1] * 3), valid, 255)


@pytest.mark.slow
def test_http_cog_gives_the_same_labels_as_the_local_file(tmp_path, client, seeded_net):
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(GEO["RGB.byte.tif"], served / "scene.tif")
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    cog_translate(str(served / "scene.tif"), str(served / "x.tif"), cog_profiles.get("deflate"), quiet=True)
    shutil.copy(served / "x.tif", served / "scene-without-suffix")
    server = serve(str(served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        weights, _ = seeded_net(THREE_BANDS)
        mean, std = [40.0, 50.0, 55.0], [25.0, 25.0, 30.0]
        url = f"http://127.0.0.1:{server.server_address[1]}/x.tif"
        RangeHandler.requests_seen.clear()
        remote = run_workflow(tmp_path, client, url, THREE_BANDS, weights, mean, std, path="out/remote.tif")
        assert RangeHandler.requests_seen, "no range request reached the server"
        local = run_workflow(tmp_path, client, served / "x.tif", THREE_BANDS, weights, mean, std, path="out/local.tif")
        # a URL whose path has no raster suffix opens as rasterio opens it (GDAL's allowed-extensions filter refused it)
        bare = open_source(f"http://127.0.0.1:{server.server_address[1]}/scene-without-suffix", 2)
        assert bare.shape == open_source(str(served / "x.tif"), 2).shape
    finally:
        server.shutdown()
    with rasterio.open(remote.outputs[0]) as a, rasterio.open(local.outputs[0]) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.transform == b.transform and a.crs == b.crs


def test_geojson_polygons_of_an_input_without_a_crs_are_refused_before_any_work(
    tmp_path, client, make_raster, make_model, write_workflow
):
    """GDAL writes such polygons as a GeoJSON with no ``crs`` member, which every reader takes for WGS 84
    longitude/latitude: refused when the input is planned (exit 2), not after the inference, naming GeoPackage."""
    path, _ = make_raster((3, 96, 120), crs=None)
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights, output={"vectors": "out/{stem}.geojson"}))
    done = run_cli("run", workflow, "--scheduler", client.scheduler.address)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"tilemask: error: {tmp_path / 'out' / 'scene.geojson'}: {path} has no CRS, and a GeoJSON "
                           "without one is read as WGS 84 longitude/latitude; write the polygons to .gpkg, .fgb or "
                           ".parquet, which keep the raster's CRS as it is\n")  # fmt: skip
    assert not (tmp_path / "out").exists()  # no output, and no job folder of a run refused before any work
