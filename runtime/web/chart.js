// A hand-drawn SVG line chart: one line per series over a shared time axis.
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#0b62d6", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0c8599", "#c2255c", "#5c940d"];

function svg(tag, attrs) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

export function color(i) { return COLORS[i % COLORS.length]; }

// series: [{name, points: [[t, y], ...]}]; window: seconds shown, ending at `now`.
export function lineChart(container, series, { now, window, unit }) {
  const width = Math.max(300, Math.round(container.clientWidth || 600)), height = 180, left = 56, bottom = 18, top = 10;
  const max = Math.max(1e-9, ...series.flatMap((s) => s.points.map((p) => p[1])));
  const x = (t) => left + ((t - (now - window)) / window) * (width - left - 4);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}` });
  root.append(svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width, y2: height - bottom }));
  root.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }));
  const label = (text, attrs) => { const t = svg("text", attrs); t.textContent = text; root.append(t); };
  label(`${max >= 10 ? max.toFixed(0) : max.toFixed(2)} ${unit}`, { x: 2, y: top + 8 });
  label("0", { x: 2, y: height - bottom });
  label(window >= 120 ? `-${Math.round(window / 60)} min` : `-${Math.round(window)} s`, { x: left, y: height - 4 });
  label("now", { x: width - 26, y: height - 4 });
  series.forEach((s, i) => {
    if (s.points.length < 2) return;
    const d = s.points.map(([t, v], j) => `${j ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join("");
    root.append(svg("path", { d, fill: "none", stroke: color(i), "stroke-width": 1.5 }));
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((s, i) => {
    const item = document.createElement("span");
    item.style.color = color(i);
    item.textContent = `● ${s.name}`;
    legend.append(item);
  });
  container.replaceChildren(root);
  container.after(legend);
  if (container._legend) container._legend.remove();
  container._legend = legend;
}
