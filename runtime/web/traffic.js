// Traffic view: requests/s and generated tokens/s per model, from this node's Prometheus counters.
import { request } from "./api.js";
import { cluster } from "./cluster.js";
import { lineChart } from "./chart.js";
import { el, rate } from "./util.js";

const WINDOW = 300;
const samples = [];

function parseCounters(text) {
  const requests = {}, tokens = {};
  const pattern = /^(omx_model_requests_total|omx_generated_tokens_total)\{model="((?:[^"\\]|\\.)*)"\} ([0-9.e+-]+)$/;
  for (const line of text.split("\n")) {
    const m = pattern.exec(line);
    if (!m) continue;
    (m[1] === "omx_model_requests_total" ? requests : tokens)[m[2]] = Number(m[3]);
  }
  return { requests, tokens };
}

function rates(kind) {
  const names = new Set(samples.flatMap((s) => Object.keys(s[kind])));
  return [...names].sort().map((name) => ({
    name,
    points: samples.slice(1).map((s, i) => {
      const prev = samples[i];
      const dt = s.t - prev.t;
      return [s.t, dt > 0 ? Math.max(0, ((s[kind][name] || 0) - (prev[kind][name] || 0)) / dt) : 0];
    }),
  }));
}

export async function sample() {
  const text = await (await request("/metrics")).text();
  const now = performance.now() / 1000;
  samples.push({ t: now, ...parseCounters(text) });
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
  const node = cluster.self?.name || cluster.selfId || "this node";
  const rows = req.map((s) => {
    const r = s.points.at(-1)?.[1] ?? 0;
    const t = tok.find((x) => x.name === s.name)?.points.at(-1)?.[1] ?? 0;
    return el("tr", {}, el("td", {}, node), el("td", {}, s.name), el("td", {}, rate(r)), el("td", {}, rate(t)),
      el("td", {}, last.requests[s.name] ?? 0), el("td", {}, last.tokens[s.name] ?? 0));
  });
  document.getElementById("traffic-body").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No model requests served by this node yet."))]));
}

export function redrawTraffic() { if (samples.length) render(performance.now() / 1000); }
