// Cluster view: every member from the live event stream, with each member's load from /api/distributed/nodes.
import { getJSON } from "./api.js";
import { el, percent } from "./util.js";

export const cluster = { nodes: new Map(), selfId: null, self: null, load: new Map(), listeners: [] };

function changed() { render(); for (const fn of cluster.listeners) fn(); }

export function applyEvent(msg) {
  if (msg.type === "snapshot") {
    cluster.nodes = new Map(msg.nodes.map((n) => [n.id, n]));
    changed();
  } else if (msg.type === "member") {
    cluster.nodes.set(msg.node.id, msg.node);
    changed();
  } else if (msg.type === "tick") {
    refreshSelf();
  }
}

// Each member's in-flight and queued requests and loaded models, as this node knows them:
// its own first-hand, the others' from their latest load report (null when none is fresh).
function takeLoad(rows) {
  cluster.load = new Map(rows.map((n) => [n.id, { inFlight: n.in_flight, queued: n.queued, loaded: n.loaded }]));
}

export async function refreshSelf() {
  const [status, nodes] = await Promise.all([getJSON("/api/distributed/status"), getJSON("/api/distributed/nodes")]);
  cluster.selfId = status.node.id;
  cluster.self = { name: status.node.name };
  takeLoad(nodes.nodes);
  document.getElementById("node-label").textContent = `${status.node.name || status.node.id} · ${status.node.services.api}`;
  if (!cluster.nodes.size) cluster.nodes = new Map(nodes.nodes.map((n) => [n.id, n]));
  changed();
}

export async function refreshNodes() {
  const data = await getJSON("/api/distributed/nodes");
  cluster.nodes = new Map(data.nodes.map((n) => [n.id, n]));
  takeLoad(data.nodes);
  changed();
}

function shown(x) { return x === null || x === undefined ? "—" : x; }

const ORDER = { alive: 0, suspect: 1, leaving: 2, failed: 3, left: 4 };

function render() {
  const body = document.getElementById("nodes-body");
  const rows = [...cluster.nodes.values()].sort((a, b) =>
    (ORDER[a.status] ?? 9) - (ORDER[b.status] ?? 9) || (a.name || a.id).localeCompare(b.name || b.id, undefined, { numeric: true }));
  const alive = rows.filter((n) => n.status === "alive").length;
  document.getElementById("cluster-summary").textContent = `${rows.length} node${rows.length === 1 ? "" : "s"}, ${alive} alive`;
  body.replaceChildren(...rows.map((n) => {
    const load = cluster.load.get(n.id) || {};
    const res = n.resources || {};
    return el("tr", { "data-node-id": n.id },
      el("td", { class: `status-${n.status}` }, n.status),
      el("td", {}, n.name || "—", n.self ? el("span", { class: "muted" }, " (this node)") : null),
      el("td", {}, el("code", {}, n.id)),
      el("td", {}, n.address || "—"),
      el("td", {}, percent(res.cpu)), el("td", {}, percent(res.memory)), el("td", {}, percent(res.disk)),
      el("td", {}, (n.models || []).join(", ") || "—"),
      el("td", {}, load.loaded ? load.loaded.join(", ") || "none" : "—"),
      el("td", {}, shown(load.inFlight)),
      el("td", {}, shown(load.queued)));
  }));
}
