// Models view: the cluster's models and their placement, live transfers, and the actions on them.
import { getJSON, ndjson, postJSON, request } from "./api.js";
import { cluster } from "./cluster.js";
import { bytes, el, showError } from "./util.js";

const MAX_FACTOR = 16;
let models = [];
// Factors typed and not yet set, by model: the table is redrawn every second and on every cluster event,
// and a redraw must not take back what the user is typing (nor the focus of the field).
const drafts = new Map();

function nodeLabel(id) {
  const n = cluster.nodes.get(id);
  return n && n.name ? `${n.name} (${id})` : id;
}

async function act(what, fn) {
  try {
    showError("");
    await fn();
  } catch (err) {
    showError(`${what}: ${err.message}`);
  } finally {
    refreshModels();
  }
}

export async function refreshModels() {
  const [placed, replication] = await Promise.all([
    getJSON("/api/distributed/models"), getJSON("/api/distributed/replication/status")]);
  models = placed.models;
  renderModels();
  renderTransfers(replication.transfers || []);
  document.dispatchEvent(new CustomEvent("omx:models", { detail: models }));
}

function renderModels() {
  const body = document.getElementById("models-body");
  const focused = body.contains(document.activeElement) ? document.activeElement.getAttribute("aria-label") : null;
  for (const name of drafts.keys()) if (!models.some((m) => m.name === name)) drafts.delete(name);
  body.replaceChildren(...models.map((m) => {
    const factor = el("input", { type: "number", min: 1, max: MAX_FACTOR, value: drafts.get(m.name) ?? m.factor,
      "aria-label": `Factor of ${m.name}`, oninput: () => drafts.set(m.name, factor.value) });
    const setFactor = () => {
      const value = Number(factor.value);
      drafts.delete(m.name);
      act("set factor", () => postJSON("/api/distributed/replicate", { model: m.name, factor: value }));
    };
    return el("tr", { "data-model": m.name },
      el("td", {}, m.name), el("td", {}, m.status), el("td", {}, bytes(m.total_size)),
      el("td", {}, m.replicas), el("td", {}, m.factor),
      el("td", {}, m.nodes.map(nodeLabel).join(", ") || "—"),
      el("td", { class: "actions" },
        factor,
        el("button", { type: "button", "aria-label": `Set factor of ${m.name}`, onclick: setFactor }, "Set factor"),
        el("button", { type: "button", "aria-label": `Migrate ${m.name}`, onclick: () => openMigrate(m) }, "Migrate"),
        el("button", { type: "button", "aria-label": `Delete ${m.name}`,
          onclick: () => confirm(`Delete ${m.name} from every node of the cluster?`) && act("delete", () => request("/api/delete", { method: "DELETE", body: { model: m.name } })) }, "Delete")));
  }));
  if (focused) {
    const again = [...body.querySelectorAll("[aria-label]")].find((node) => node.getAttribute("aria-label") === focused);
    if (again) again.focus();
  }
}

function renderTransfers(transfers) {
  const body = document.getElementById("transfers-body");
  if (!transfers.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No transfers running.")));
    return;
  }
  body.replaceChildren(...transfers.map((t) => el("tr", {},
    el("td", {}, t.model), el("td", {}, nodeLabel(t.to)), el("td", {}, t.sources.map(nodeLabel).join(", ") || "—"),
    el("td", {}, t.error ? `${t.state}: ${t.error}` : t.state),
    el("td", {}, el("progress", { max: t.bytes_total || 1, value: t.bytes_done, "aria-label": `Transfer of ${t.model}` }),
      ` ${bytes(t.bytes_done)} / ${bytes(t.bytes_total)}`))));
}

function openMigrate(model) {
  const dialog = document.getElementById("migrate-dialog");
  const ids = [...cluster.nodes.values()].filter((n) => n.status === "alive").map((n) => n.id);
  const option = (id) => el("option", { value: id }, nodeLabel(id));
  document.getElementById("migrate-title").textContent = `Migrate ${model.name}`;
  document.getElementById("migrate-from").replaceChildren(...model.nodes.map(option));
  document.getElementById("migrate-to").replaceChildren(...ids.filter((id) => !model.nodes.includes(id)).map(option));
  dialog.onclose = () => {
    if (dialog.returnValue !== "ok") return;
    const from_node = document.getElementById("migrate-from").value;
    const to_node = document.getElementById("migrate-to").value;
    if (from_node && to_node) act("migrate", () => postJSON("/api/distributed/migrate", { model_name: model.name, from_node, to_node }));
  };
  dialog.showModal();
}

async function pull(event) {
  event.preventDefault();
  const name = document.getElementById("pull-name").value.trim();
  const bar = document.getElementById("pull-progress");
  const status = document.getElementById("pull-status");
  bar.hidden = false;
  bar.removeAttribute("value");
  await act("pull", async () => {
    const response = await request("/api/pull", { method: "POST", body: { model: name, stream: true } });
    for await (const line of ndjson(response)) {
      if (line.error) throw new Error(line.error);
      status.textContent = line.status || "";
      if (line.total) { bar.max = line.total; bar.value = line.completed || 0; }
    }
  });
  bar.hidden = true;
}

export function initModels() {
  document.getElementById("pull-form").addEventListener("submit", pull);
  document.getElementById("rebalance").addEventListener("click", () =>
    act("rebalance", async () => {
      const r = await postJSON("/api/distributed/rebalance");
      document.getElementById("pull-status").textContent = `Rebalance: ${r.plan.length} step${r.plan.length === 1 ? "" : "s"} planned`;
    }));
  cluster.listeners.push(renderModels);
}
