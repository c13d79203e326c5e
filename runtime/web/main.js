// The dashboard's entry: tabs, the API key prompt, the live stream and the polling that feeds each view.
import { ApiError, events, getJSON, onUnauthorized, setApiKey } from "./api.js";
import { refreshChatModels, initChat } from "./chat.js";
import { applyEvent, refreshSelf } from "./cluster.js";
import { refreshFunctions } from "./functions.js";
import { initModels, refreshModels } from "./models.js";
import { redrawTraffic, sample } from "./traffic.js";
import { showError } from "./util.js";

const tabs = [...document.querySelectorAll("[role=tab]")];
let stream = null;
let asking = false;

function select(tab, focus = false) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  location.hash = tab.id.slice(4);
  if (tab.id === "tab-traffic") redrawTraffic();
  if (tab.id === "tab-chat") quietly(refreshChatModels);
  if (tab.id === "tab-models") quietly(refreshModels);
  if (tab.id === "tab-functions") quietly(refreshFunctions);
}

function initTabs() {
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) select(tabs[(i + step + tabs.length) % tabs.length], true);
      if (e.key === "Home") select(tabs[0], true);
      if (e.key === "End") select(tabs[tabs.length - 1], true);
    });
  });
  const wanted = tabs.find((t) => t.id === `tab-${location.hash.slice(1)}`);
  if (wanted) select(wanted);
}

function askKey() {
  if (asking) return;
  asking = true;
  document.getElementById("key-button").hidden = false;
  const dialog = document.getElementById("key-dialog");
  dialog.onclose = () => {
    asking = false;
    const key = document.getElementById("key-input").value.trim();
    if (!key) return;
    setApiKey(key);
    document.getElementById("key-input").value = "";
    showError("");
    start();
  };
  dialog.showModal();
}

async function quietly(fn) {
  try {
    await fn();
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) showError(err.message);
  }
}

function setLive(state) {
  const badge = document.getElementById("live");
  badge.textContent = state === "live" ? "live" : "reconnecting…";
}

async function start() {
  try {
    await getJSON("/api/distributed/status");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;  // the key prompt is open
    showError(err.message);
  }
  if (stream) stream.reconnect();
  else stream = events(applyEvent, setLive);
  await quietly(refreshSelf);
  await quietly(refreshModels);
  await quietly(refreshChatModels);
  await quietly(sample);
}

onUnauthorized(askKey);
document.getElementById("key-button").addEventListener("click", askKey);
initTabs();
initModels();
initChat();
setInterval(() => quietly(sample), 2000);
setInterval(() => { if (!document.getElementById("view-models").hidden) quietly(refreshModels); }, 1000);
setInterval(() => { if (!document.getElementById("view-functions").hidden) quietly(refreshFunctions); }, 2000);
start();
