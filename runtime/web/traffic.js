// Traffic view: requests/s and generated tokens/s per node and model, from every node's counters
// (GET /api/distributed/traffic: this node asks the others), sampled every 2 s since the page opened.
import { getJSON } from "./api.js";
import { lineChart } from "./chart.js";
import { el, rate } from "./util.js";

const WINDOW = 300;
const samples = [];
const labels = new Map();  // series key -> { node, model }

// One sample: counters keyed "node\u0000model".
function counters(doc) {
  const requests = {}, tokens = {};
  for (const node of doc.nodes || []) {
    for (const [model, c] of Object.entries(node.models || {})) {
      const key = `${node.id}\u0000${model}`;
      labels.set(key, { id: node.id, node: node.name || node.id, model });
      requests[key] = c.requests;
      tokens[key] = c.tokens;
    }
  }
  return { requests, tokens };
}

// A node that restarted counts from zero again: a drop is a restart, not negative traffic.
function delta(now, prev) { return now >= prev ? now - prev : now; }

function rates(kind) {
  const keys = new Set(samples.flatMap((s) => Object.keys(s[kind])));
  return [...keys].sort().map((key) => ({
    key,
    name: `${labels.get(key).model} · ${labels.get(key).node}`,
    points: samples.slice(1).map((s, i) => {
      const prev = samples[i];
      const dt = s.t - prev.t;
      return [s.t, dt > 0 && key in s[kind] ? delta(s[kind][key], prev[kind][key] ?? 0) / dt : 0];
    }),
  }));
}

export async function sample() {
  const doc = await getJSON("/api/distributed/traffic");
  const now = performance.now() / 1000;
  samples.push({ t: now, ...counters(doc) });
  while (samples.length && samples[0].t < now - WINDOW - 5) samples.shift();
  render(now);
}

function render(now) {
  if (document.getElementById("view-traffic").hidden) return;
  const req = rates("requests"), tok = rates("tokens");
  // The window grows with the samples taken (from one minute up to five), so a fresh page shows a readable line.
  const window = Math.min(WINDOW, Math.max(60, now - samples[0].t));
  lineChart(document.getElementById("chart-requests"), req, { now, window, unit: "req/s" });
  lineChart(document.getElementById("chart-tokens"), tok, { now, window, unit: "tok/s" });
  const last = samples[samples.length - 1];
  const rows = req.map((s) => {
    const r = s.points.at(-1)?.[1] ?? 0;
    const t = tok.find((x) => x.key === s.key)?.points.at(-1)?.[1] ?? 0;
    const { id, node, model } = labels.get(s.key);
    return el("tr", { "data-node-id": id, "data-model": model }, el("td", {}, node), el("td", {}, model),
      el("td", {}, rate(r)), el("td", {}, rate(t)), el("td", {}, last.requests[s.key] ?? 0), el("td", {}, last.tokens[s.key] ?? 0));
  });
  document.getElementById("traffic-body").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No model requests served in the cluster yet."))]));
}

export function redrawTraffic() { if (samples.length) render(performance.now() / 1000); }
