// Shared by the scan page and the log page: settings in localStorage, API calls with the token.
"use strict";

const Settings = {
  get(k) { try { return localStorage.getItem("hierfg." + k) || ""; } catch (e) { return ""; } },
  set(k, v) { try { localStorage.setItem("hierfg." + k, v); } catch (e) { /* private mode: keep going */ } },
};

class ApiError extends Error {
  constructor(message, status, kind) { super(message); this.status = status; this.kind = kind; }
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  const token = Settings.get("token");
  if (token) headers["Authorization"] = "Bearer " + token;
  let resp;
  try {
    resp = await fetch(path, Object.assign({}, opts, { headers }));
  } catch (e) {
    throw new ApiError("cannot reach the server (" + e.message + ")", 0, "network");
  }
  if (!resp.ok) {
    let msg = resp.status + " " + resp.statusText, kind = "http";
    try { const j = await resp.json(); msg = j.error || msg; kind = j.kind || kind; } catch (e) { /* not JSON */ }
    throw new ApiError(msg, resp.status, kind);
  }
  return resp;
}

function el(tag, attrs = {}, ...children) {
  // Text only through textContent: labels and ids typed by people never become HTML.
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function pct(p) { return Math.round(p * 100) + "%"; }
