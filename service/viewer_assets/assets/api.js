// The viewer's calls to its server: the bearer token (kept for this tab only) and JSON errors.
// Under mutual TLS the browser presents its client certificate itself; no token is needed then.

const TOKEN_KEY = "ecgx.viewer.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// POST a KServe v2 request with binary tensor data: the JSON header, then `blob` (Triton's
// binary extension, Inference-Header-Content-Length); the answer is JSON (no binary outputs asked).
export async function callBinary(path, head, blob) {
  const json = new TextEncoder().encode(JSON.stringify(head));
  const body = new Uint8Array(json.length + blob.length);
  body.set(json, 0);
  body.set(blob, json.length);
  return call(path, { method: "POST", raw: body, extraHeaders: { "Inference-Header-Content-Length": String(json.length) } });
}

// GET (or POST with a JSON body) a path of this server; the parsed JSON answer, or ApiError with
// the server's own message ({"error": ...}) and its gRPC code (the Ecgx-Status header).
export async function call(path, { method = "GET", body = null, raw = null, extraHeaders = {} } = {}) {
  const headers = { ...extraHeaders };
  const t = token();
  if (t) headers["Authorization"] = `Bearer ${t}`;
  if (body !== null) headers["Content-Type"] = "application/json";
  if (raw !== null) headers["Content-Type"] = "application/octet-stream";
  const response = await fetch(path, {
    method,
    headers,
    body: raw !== null ? raw : body === null ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = (data && data.error) || `HTTP ${response.status}`;
    throw new ApiError(response.status, response.headers.get("Ecgx-Status") || "", message);
  }
  return data;
}

export function describeError(e) {
  if (e instanceof ApiError) {
    const what = e.status === 401 ? "Not signed in" : e.status === 403 ? "Not allowed" : `Error ${e.status}`;
    return `${what}${e.code ? ` (${e.code})` : ""}: ${e.message}`;
  }
  return `Error: ${e.message || e}`;
}

export const enc = encodeURIComponent;

// A DOM element: el("td", {class: "x", "data-lead": "I"}, "text", child, ...).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function fmt(value, digits = 3) {
  return value === null || value === undefined ? "n/a" : Number(value).toPrecision(digits);
}

// The sign-in form: calls onSignedIn() once a call with the token succeeds, shows the error if not.
export function signIn(form, probe, onSignedIn) {
  const input = form.querySelector("input[name=token]");
  const error = form.querySelector(".error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    error.textContent = "";
    try {
      await probe();
      input.value = "";
      form.hidden = true;
      onSignedIn();
    } catch (e) {
      setToken("");
      error.textContent = describeError(e);
    }
  });
}
