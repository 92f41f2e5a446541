// The legend panel shared by the map and the viewer: one swatch per class, background (transparent) left out.
function tilemaskLegend(classes) {
  const legend = document.getElementById("legend");
  for (const c of classes) {
    if (c.rgba[3] === 0) continue;
    const row = document.createElement("div");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = c.color;
    row.appendChild(swatch);
    row.appendChild(document.createTextNode(c.name));
    legend.appendChild(row);
  }
}
