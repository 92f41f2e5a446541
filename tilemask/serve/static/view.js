// /view: NiiVue with the scan in grey and the labels over it in their class colours (a label colormap).
// window.tilemaskReady is for tests.
const config = JSON.parse(document.getElementById("config").textContent);
const RANKED_FROM = 4096;  // labels of greater values are drawn through their ranks (below)
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
  let classes = config.classes, nodata = config.nodata;
  // NiiVue's label colormap is a texture of a texel per value from the least to the greatest: past the GPU's
  // largest texture (8192 in SwiftShader; FreeSurfer's labels reach 14175, an atlas's 1e6) nothing is drawn.
  // Labels of such values are drawn through their ranks instead: a class's value becomes its place among the
  // classes (from 1), and any other value 0, transparent.
  if (Math.max(nodata ?? 0, ...classes.map((c) => c.value)) >= RANKED_FROM) {
    const rank = new Map(classes.map((c, i) => [c.value, i + 1]));
    const img = labels.img;
    for (let i = 0; i < img.length; i++) img[i] = rank.get(img[i]) ?? 0;
    classes = classes.map((c, i) => ({ ...c, value: i + 1 }));
    nodata = 0;
    labels.calMinMax();
  }
  for (const c of classes) add(c.value, c.rgba, c.name);
  // NiiVue draws a value past the last entry in the last entry's colour: the nodata label (255 where the scan had
  // invalid voxels) and values past the classes are transparent, as on the map.
  const values = new Set(cmap.I);
  const past = Math.max(...cmap.I) + 1;
  if (nodata !== null && !values.has(nodata) && nodata < past) add(nodata, [0, 0, 0, 0], "");
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
