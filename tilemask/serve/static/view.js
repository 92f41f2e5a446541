// /view: NiiVue with the scan in grey and the labels over it in their class colours (a label colormap).
// window.tilemaskReady is for tests.
const config = JSON.parse(document.getElementById("config").textContent);
tilemaskLegend(config.classes);
(async () => {
  const nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: false, crosshairWidth: 0 });
  await nv.attachTo("gl");
  const list = [];
  if (config.scan) list.push({ url: config.scan.url, name: config.scan.name, colormap: "gray" });
  list.push({ url: config.labels.url, name: config.labels.name, opacity: config.scan ? 0.7 : 1.0 });
  await nv.loadVolumes(list);
  const labels = nv.volumes[nv.volumes.length - 1];
  const cmap = { R: [], G: [], B: [], A: [], I: [], labels: [] };
  const add = (value, rgba, name) => {
    cmap.R.push(rgba[0]); cmap.G.push(rgba[1]); cmap.B.push(rgba[2]); cmap.A.push(rgba[3]);
    cmap.I.push(value); cmap.labels.push(name);
  };
  for (const c of config.classes) add(c.value, c.rgba, c.name);
  // NiiVue draws a value past the last entry in the last entry's colour: the nodata label (255 where the scan had
  // invalid voxels) and values past the classes are transparent, as on the map.
  const values = new Set(cmap.I);
  const past = Math.max(...cmap.I) + 1;
  if (config.nodata !== null && !values.has(config.nodata) && config.nodata < past) add(config.nodata, [0, 0, 0, 0], "");
  add(past, [0, 0, 0, 0], "");
  labels.setColormapLabel(cmap);
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.updateGLVolume();
  nv.drawScene();
  window.tilemaskViewer = nv;
  window.tilemaskReady = true;
})().catch((error) => {
  document.getElementById("info").textContent = "error: " + error;
  window.tilemaskError = String(error);
});
