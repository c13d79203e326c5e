// Cluster view: every member from the live event stream, with this node's own load from its status.
import { getJSON } from "./api.js";
import { el, percent } from "./util.js";

export const cluster = { nodes: new Map(), selfId: null, self: null, loaded: new Map(), listeners: [] };

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

export async function refreshSelf() {
  const [status, ps] = await Promise.all([getJSON("/api/distributed/status"), getJSON("/api/ps")]);
  const stats = status.scheduler_stats || {};
  cluster.selfId = status.node.id;
  // Rows of /api/ps name their node where the node answers for the cluster; rows without one are its own.
  cluster.loaded = new Map();
  for (const m of ps.models) {
    const node = m.node || status.node.id;
    cluster.loaded.set(node, [...(cluster.loaded.get(node) || []), m.name]);
  }
  cluster.self = {
    loaded: cluster.loaded.get(status.node.id) || [],
    inFlight: stats.active_requests ?? 0,
    queued: stats.queued_requests ?? 0,
    name: status.node.name,
  };
  document.getElementById("node-label").textContent = `${status.node.name || status.node.id} · ${status.node.services.api}`;
  if (!cluster.nodes.size) await refreshNodes();
  changed();
}

export async function refreshNodes() {
  const data = await getJSON("/api/distributed/nodes");
  cluster.nodes = new Map(data.nodes.map((n) => [n.id, n]));
  changed();
}

const ORDER = { alive: 0, suspect: 1, leaving: 2, failed: 3, left: 4 };

function render() {
  const body = document.getElementById("nodes-body");
  const rows = [...cluster.nodes.values()].sort((a, b) =>
    (ORDER[a.status] ?? 9) - (ORDER[b.status] ?? 9) || (a.name || a.id).localeCompare(b.name || b.id, undefined, { numeric: true }));
  const alive = rows.filter((n) => n.status === "alive").length;
  document.getElementById("cluster-summary").textContent = `${rows.length} node${rows.length === 1 ? "" : "s"}, ${alive} alive`;
  body.replaceChildren(...rows.map((n) => {
    const own = n.id === cluster.selfId || n.self ? cluster.self : null;
    const res = n.resources || {};
    return el("tr", { "data-node-id": n.id },
      el("td", { class: `status-${n.status}` }, n.status),
      el("td", {}, n.name || "—", n.self ? el("span", { class: "muted" }, " (this node)") : null),
      el("td", {}, el("code", {}, n.id)),
      el("td", {}, n.address || "—"),
      el("td", {}, percent(res.cpu)), el("td", {}, percent(res.memory)), el("td", {}, percent(res.disk)),
      el("td", {}, (n.models || []).join(", ") || "—"),
      el("td", {}, own ? own.loaded.join(", ") || "none" : (cluster.loaded.get(n.id) || ["—"]).join(", ")),
      el("td", {}, own ? own.inFlight : "—"),
      el("td", {}, own ? own.queued : "—"));
  }));
}
