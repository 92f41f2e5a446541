// /map: label COG tiles in their class colours, polygons as OGC API Features over them, a legend, and a
// click that asks /point for the class. window.tilemaskMap and window.tilemaskReady are for tests.
const config = JSON.parse(document.getElementById("config").textContent);

// The view's extent as an OGC API bbox: longitudes past +-180 (the world repeats as the map pans or zooms out)
// wrapped back, a minlon larger than the maxlon across the antimeridian, the whole world when it is all in view.
function lonLatBox([x0, y0, x1, y1]) {
  const wrap = (x) => ((((x + 180) % 360) + 360) % 360) - 180;
  const lat = (y) => Math.max(-90, Math.min(90, y));
  if (x1 - x0 >= 360) return [-180, lat(y0), 180, lat(y1)];
  if (x0 >= -180 && x1 <= 180) return [x0, lat(y0), x1, lat(y1)];
  return [wrap(x0), lat(y0), wrap(x1), lat(y1)];
}
// A tile fetched rather than left to an <img>, so that the server's reason for one it cannot draw (a COG whose
// tiles are cut short or do not decompress: 422) is named in #info and window.tilemaskError, not a silent gap.
// A 404 with the header X-Tilemask-Outside is a tile outside the output: nothing to draw there. Any other (the
// output removed while the page is open) is named.
const TILE_LOADING = 1, TILE_ERROR = 3;  // ol's TileState (the full build does not export it)
function tileFailed(tile, reason) {
  if (reason) {
    window.tilemaskError = reason;
    const info = document.getElementById("info");
    info.textContent = `not all tiles drawn: ${reason}`;
    delete info.dataset.value;  // no longer the class a click named
  }
  tile.setState(TILE_ERROR);
}
function tileLoader(path) {
  return async (tile, src) => {
    const image = tile.getImage();  // now: a tile the map drops meanwhile (its cache trimmed) lets it go
    let response, body;
    try {
      response = await fetch(src);
      body = response.ok ? await response.blob() : await response.text();
    } catch (error) {  // the server went away
      tileFailed(tile, `${path}: ${error.message}`);
      return;
    }
    if (tile.getState() !== TILE_LOADING) return;  // dropped by the map while it was fetched
    if (!response.ok) {
      let detail;
      try { detail = JSON.parse(body).detail; } catch (e) { /* not JSON */ }
      const reason = typeof detail === "string" ? detail : `${path}: ${response.status} ${body}`;
      const outside = response.status === 404 && response.headers.get("X-Tilemask-Outside") === "1";
      tileFailed(tile, outside ? null : reason);
      return;
    }
    const url = URL.createObjectURL(body);
    const revoke = () => URL.revokeObjectURL(url);
    image.addEventListener("load", revoke, { once: true });
    image.addEventListener("error", revoke, { once: true });
    image.src = url;
  };
}
const layers = [];
const classes = new Map();  // by name, the first output's: what colours the polygons (their "class" is a name)
const swatches = new Map();  // by name and colour, with the outputs drawing it so
for (const r of config.rasters) {
  for (const c of r.classes) {
    if (!classes.has(c.name)) classes.set(c.name, c);
    const key = `${c.name}\n${c.color}`;
    if (!swatches.has(key)) swatches.set(key, { ...c, outputs: [] });
    swatches.get(key).outputs.push(r.path);
  }
  layers.push(new ol.layer.Tile({
    source: new ol.source.XYZ({
      url: "tiles/{z}/{x}/{y}.png?output=" + encodeURIComponent(r.path),
      tileLoadFunction: tileLoader(r.path), interpolate: false, maxZoom: 24, transition: 0,
    }),
  }));
}
// Every feature in the view, page after page: the server answers at most 10,000 a page, with a "next" link to
// the rest, up to MOST_FEATURES a view (past them, #info asks to zoom in). window.tilemaskLoading counts the
// pages being fetched (for tests); a layer whose pages fail is named in #info and window.tilemaskError.
const PAGE = 10000;
const MOST_FEATURES = 200000;
const geojson = new ol.format.GeoJSON();
window.tilemaskLoading = 0;
function pagedLoader(p, source) {
  return async (extent, resolution, projection, success, failure) => {
    const bbox = lonLatBox(ol.proj.transformExtent(extent, projection, "EPSG:4326"));
    let url = "collections/" + encodeURIComponent(p.id) + "/items?limit=" + PAGE + "&bbox=" + bbox.join(",");
    const loaded = [];
    window.tilemaskLoading += 1;
    try {
      while (url) {
        const response = await fetch(url);
        if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
        const page = await response.json();
        const features = geojson.readFeatures(page, { featureProjection: projection });
        source.addFeatures(features);  // features already there (same id, from another extent) are skipped
        loaded.push(...features);
        const next = (page.links || []).find((link) => link.rel === "next");
        url = next ? next.href : null;
        if (url && loaded.length >= MOST_FEATURES) {
          document.getElementById("info").textContent =
            `${p.path}: the first ${loaded.length} polygons of this view are drawn; zoom in for the rest`;
          source.removeLoadedExtent(extent);  // asked again when the view changes
          url = null;
        }
      }
      success(loaded);
    } catch (error) {
      source.removeLoadedExtent(extent);
      window.tilemaskError = `${p.path}: ${error.message}`;
      document.getElementById("info").textContent = `${p.path}: not all polygons loaded (${error.message})`;
      failure();
    } finally {
      window.tilemaskLoading -= 1;
    }
  };
}
for (const p of config.polygons) {
  const source = new ol.source.Vector({ strategy: ol.loadingstrategy.bbox });
  source.setLoader(pagedLoader(p, source));
  layers.push(new ol.layer.Vector({
    source,
    style: (feature) => new ol.style.Style({
      stroke: new ol.style.Stroke({ color: (classes.get(feature.get("class")) || { color: "#333" }).color, width: 1.5 }),
    }),
  }));
}
// The shortest run of longitudes holding every [west, east] (east < west: across the antimeridian), as
// [west, east] with east past 180 where it crosses: going round the globe, it leaves out the widest gap.
function lonSpan(spans) {
  const arcs = spans.map(([w, e]) => {
    const start = ((((w + 180) % 360) + 360) % 360) - 180;
    return [start, start + (e >= w ? e - w : e - w + 360)];
  }).sort((a, b) => a[0] - b[0]);
  const merged = [];
  for (const [s, e] of arcs) {
    const last = merged[merged.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e); else merged.push([s, e]);
  }
  let widest = 0, after = -1;  // the gap after merged[after], up to the next arc (the first one, once round)
  merged.forEach(([, end], i) => {
    const gap = (i + 1 < merged.length ? merged[i + 1][0] : merged[0][0] + 360) - end;
    if (gap > widest) { widest = gap; after = i; }
  });
  if (after < 0) return [-180, 180];  // no gap: every longitude
  const first = (after + 1) % merged.length;
  return [merged[first][0], merged[after][1] + (first === 0 ? 0 : 360)];
}
const map = new ol.Map({ target: "map", layers, view: new ol.View({ center: [0, 0], zoom: 2 }) });
// fitted to the output asked for (/map?output=), else to every layer; past 180 degrees east where the extents
// cross it: the map repeats there
const fitted = (config.zoom_to_output ? config.rasters : config.rasters.concat(config.polygons)).filter((e) => e.bounds);
if (fitted.length) {
  const [west, east] = lonSpan(fitted.map((e) => [e.bounds[0], e.bounds[2]]));
  const south = Math.min(...fitted.map((e) => e.bounds[1])), north = Math.max(...fitted.map((e) => e.bounds[3]));
  map.getView().fit(ol.proj.transformExtent([west, south, east, north], "EPSG:4326", "EPSG:3857"),
                    { padding: [10, 10, 10, 10] });
}
// A class name two outputs draw in two colours (their classes in another order) is a row per colour, naming
// the outputs: one row would tell the reader the wrong colour for the others.
const colourCount = new Map();  // of each name, among the swatches shown (background is transparent: none)
for (const c of swatches.values()) if (c.rgba[3] !== 0) colourCount.set(c.name, (colourCount.get(c.name) || 0) + 1);
tilemaskLegend(Array.from(swatches.values(), (c) =>
  colourCount.get(c.name) > 1 ? { ...c, name: `${c.name} (${c.outputs.join(", ")})` } : c));
map.on("singleclick", async (event) => {
  const [lon, lat] = ol.proj.toLonLat(event.coordinate);
  const info = document.getElementById("info");
  let noData = false;
  // The layer drawn on top first (the last one), down through those transparent there (nodata, or outside).
  for (const r of config.rasters.slice().reverse()) {
    const response = await fetch(`point?output=${encodeURIComponent(r.path)}&lon=${lon}&lat=${lat}`);
    if (!response.ok) {
      let detail;
      try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
      if (response.status === 404 && response.headers.get("X-Tilemask-Outside") === "1") continue;  // outside
      info.textContent = typeof detail === "string" ? detail : `${r.path}: ${response.status}`;  // gone, damaged
      delete info.dataset.value;
      return;
    }
    const answer = await response.json();
    if (answer.class === null) { noData = true; continue; }
    info.textContent = answer.class;
    info.dataset.value = answer.value;
    return;
  }
  info.textContent = noData ? "no data" : "outside the outputs";
  delete info.dataset.value;
});
map.once("rendercomplete", () => { window.tilemaskReady = true; });
window.tilemaskMap = map;
