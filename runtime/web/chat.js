// Chat playground: stream a reply from /api/chat and show its timings and the node that served it.
import { getJSON, ndjson, request } from "./api.js";
import { cluster } from "./cluster.js";
import { el, showError } from "./util.js";

const history = [];
let busy = false;

export async function refreshChatModels() {
  const [local, placed] = await Promise.all([getJSON("/api/tags"), getJSON("/api/distributed/models")]);
  const select = document.getElementById("chat-model");
  const current = select.value;
  const names = new Set(local.models.map((m) => m.name));
  const remote = placed.models.map((m) => m.name).filter((n) => !names.has(n));
  const options = [...[...names].sort().map((n) => el("option", { value: n }, n)),
    ...remote.sort().map((n) => el("option", { value: n }, `${n} (on peers)`))];
  select.replaceChildren(...options);
  if ([...names, ...remote].includes(current)) select.value = current;
}

function bubble(role, text) {
  const body = el("span", { class: "text" }, text);
  const node = el("div", { class: `msg ${role}` }, el("span", { class: "who" }, role), body);
  document.getElementById("conversation").append(node);
  return body;
}

async function send(event) {
  event.preventDefault();
  if (busy) return;
  const model = document.getElementById("chat-model").value;
  const box = document.getElementById("chat-message");
  const content = box.value.trim();
  if (!model || !content) return;
  busy = true;
  document.getElementById("chat-send").disabled = true;
  const timings = document.getElementById("chat-timings");
  timings.textContent = "Waiting for the first token…";
  showError("");
  history.push({ role: "user", content });
  bubble("user", content);
  box.value = "";
  const reply = bubble("assistant", "");
  const started = performance.now();
  let firstToken = null, text = "", final = null;
  try {
    const response = await request("/api/chat", { method: "POST", body: { model, messages: history, stream: true } });
    const servedBy = response.headers.get("X-Omx-Node") || cluster.selfId || "this node";
    for await (const line of ndjson(response)) {
      if (line.error) throw new Error(line.error);
      const piece = line.message?.content || "";
      if (piece && firstToken === null) firstToken = performance.now();
      text += piece;
      reply.textContent = text;
      if (line.done) final = line;
    }
    history.push({ role: "assistant", content: text });
    const wall = (performance.now() - started) / 1000;
    const tokens = final?.eval_count ?? 0;
    const evalSeconds = (final?.eval_duration ?? 0) / 1e9;
    const tps = evalSeconds > 0 ? tokens / evalSeconds : (wall > 0 ? tokens / wall : 0);
    const ttft = firstToken === null ? "—" : `${Math.round(firstToken - started)} ms`;
    timings.textContent = `${tokens} tokens · ${tps.toFixed(1)} tokens/s · time to first token ${ttft} · ` +
      `total ${wall.toFixed(2)} s · served by ${servedBy}`;
    timings.dataset.node = servedBy;
  } catch (err) {
    history.pop();
    reply.textContent = text || "(no reply)";
    timings.textContent = "";
    showError(`chat: ${err.message}`);
  } finally {
    busy = false;
    document.getElementById("chat-send").disabled = false;
  }
}

export function initChat() {
  document.getElementById("chat-form").addEventListener("submit", send);
  document.getElementById("chat-message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); document.getElementById("chat-form").requestSubmit(); }
  });
  document.getElementById("chat-clear").addEventListener("click", () => {
    history.length = 0;
    document.getElementById("conversation").replaceChildren();
    document.getElementById("chat-timings").textContent = "";
  });
}
