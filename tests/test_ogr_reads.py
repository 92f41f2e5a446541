"""tilemask's own reads of GeoPackages (``--overwrite``'s check, regions) write nothing beside them, and serving
changes no GDAL config of the process."""

from __future__ import annotations

import subprocess
import sys

import geopandas as gpd
import pyogrio
from shapely.geometry import box

from tilemask.formats import product_mark, product_written_by_tilemask
from tilemask.stats.config import check_regions
from tilemask.stats.zonal import read_regions


def test_reading_a_tilemask_geopackage_leaves_no_aux_xml(tmp_path):
    """The GPKG driver of pyogrio's GDAL saved the dataset metadata it read (tilemask's mark, as tilemask wrote
    it in a GeoPackage of regions or statistics) as ``regions.gpkg.aux.xml`` beside the file: checking it before
    an ``--overwrite`` or reading it as regions wrote into the user's folder. PAM was off only once ``tilemask
    serve`` had created its app."""
    regions = gpd.GeoDataFrame({"id": [1, 2]}, geometry=[box(0, 0, 1, 1), box(1, 0, 2, 1)], crs="EPSG:32633")
    path = tmp_path / "regions.gpkg"
    pyogrio.write_dataframe(regions, path, driver="GPKG", dataset_metadata=product_mark(), layer_metadata=product_mark())
    assert product_written_by_tilemask(path) is True
    check_regions(str(path), "id")
    read, key = read_regions(path, "id")
    assert key == "id" and list(read["id"]) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regions.gpkg"]
    # a read of the same file by pyogrio itself, outside tilemask's reads, still does what GDAL is configured to
    pyogrio.read_dataframe(path)
    assert (tmp_path / "regions.gpkg.aux.xml").exists()


def test_creating_the_serve_app_changes_no_gdal_config(tmp_path):
    """create_app set GDAL_PAM_ENABLED=NO process-wide in pyogrio's GDAL: any other code of the process (a
    notebook serving a folder, then writing) lost its .aux.xml sidecars."""
    code = ("import pyogrio, sys; from tilemask.serve import create_app; create_app(sys.argv[1]); "
            "print(repr(pyogrio.get_gdal_config_option('GDAL_PAM_ENABLED')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None", out
