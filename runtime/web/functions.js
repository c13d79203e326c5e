// Functions view: the custom functions deployed to the cluster, their traffic and latency, and the logs of one.
import { getJSON } from "./api.js";
import { cluster } from "./cluster.js";
import { el } from "./util.js";

let shown = null;  // the function whose logs are open

function nodeName(id) {
  const n = cluster.nodes.get(id);
  return (n && n.name) || id;
}

function when(t) {
  if (typeof t === "number") return new Date(t * 1000).toLocaleTimeString();
  return t ? String(t) : "";
}

function ms(x) { return typeof x === "number" ? `${x.toFixed(x < 10 ? 1 : 0)} ms` : "—"; }

export async function refreshFunctions() {
  const data = await getJSON("/api/functions");
  const body = document.getElementById("functions-body");
  const rows = data.functions || [];
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "No functions deployed. Deploy one with omx fn deploy FILE.")));
  } else {
    body.replaceChildren(...rows.map((f) => el("tr", { "data-function": f.name },
      el("td", {}, f.name),
      el("td", {}, el("code", { title: f.version }, (f.version || "").slice(0, 12))),
      el("td", {}, el("code", {}, f.path)),
      el("td", { "data-nodes": (f.nodes || []).join(" ") }, (f.nodes || []).map(nodeName).join(", ") || "—"),
      el("td", {}, f.calls ?? 0), el("td", {}, f.errors ?? 0),
      el("td", {}, ms(f.p50_ms)), el("td", {}, ms(f.p99_ms)),
      el("td", {}, el("button", { type: "button", "aria-label": `Logs of ${f.name}`, onclick: () => openLogs(f.name) }, "Logs")))));
  }
  if (shown) await refreshLogs();
}

async function openLogs(name) {
  shown = name;
  document.getElementById("function-logs-title").textContent = `Logs of ${name}`;
  document.getElementById("function-logs-box").hidden = false;
  await refreshLogs();
}

async function refreshLogs() {
  const data = await getJSON(`/api/functions/${encodeURIComponent(shown)}/logs`);
  const lines = (data.logs || []).map((r) => `${when(r.time)} ${nodeName(r.node || "")} ${(r.version || "").slice(0, 8)}  ${r.line}`);
  const box = document.getElementById("function-logs");
  box.textContent = lines.length ? lines.join("\n") : "No log lines yet.";
}
