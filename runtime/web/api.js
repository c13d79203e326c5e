// The node's API on this origin: one fetch helper (Bearer key when set), NDJSON reading, the live event socket.
const KEY = "omx.apiKey";
let unauthorized = () => {};

export class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

export function apiKey() { return sessionStorage.getItem(KEY) || ""; }
export function setApiKey(key) { key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY); }
export function onUnauthorized(fn) { unauthorized = fn; }

function headers(json) {
  const h = {};
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(response) {
  let message = response.statusText || `HTTP ${response.status}`;
  try { message = (await response.json()).error || message; } catch { /* not JSON */ }
  if (response.status === 401) unauthorized();
  return new ApiError(message, response.status);
}

// fetch `path`; resolves to the Response when it is 2xx, else throws ApiError with the body's "error".
export async function request(path, { method = "GET", body, signal } = {}) {
  const response = await fetch(path, {
    method, signal, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJSON(path, options) { return (await request(path, options)).json(); }
export async function postJSON(path, body, options = {}) { return (await request(path, { ...options, method: "POST", body })).json(); }

// Yield each JSON line of a streamed response as it arrives.
export async function* ndjson(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).trim();
      buffer = buffer.slice(nl + 1);
      if (line) yield JSON.parse(line);
    }
    if (done) break;
  }
  if (buffer.trim()) yield JSON.parse(buffer);
}

function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// The live event stream, reconnected with backoff; the key travels as a subprotocol (browsers cannot set headers).
export function events(onMessage, onState) {
  let delay = 500;
  let socket = null;
  const connect = () => {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/distributed/events?interval=2`;
    const key = apiKey();
    socket = new WebSocket(url, key ? ["omx", `omx.bearer.${base64url(key)}`] : ["omx"]);
    socket.onopen = () => { delay = 500; onState("live"); };
    socket.onmessage = (e) => onMessage(JSON.parse(e.data));
    socket.onclose = () => {
      onState("reconnecting");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 5000);
    };
  };
  connect();
  return { reconnect: () => socket && socket.close() };
}
