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
  for (const c of config.classes) {
    cmap.R.push(c.rgba[0]); cmap.G.push(c.rgba[1]); cmap.B.push(c.rgba[2]); cmap.A.push(c.rgba[3]);
    cmap.I.push(c.value); cmap.labels.push(c.name);
  }
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
