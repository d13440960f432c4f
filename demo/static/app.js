// The scan page: capture (camera or file) -> POST /api/scans -> breadcrumb -> confirm / correct / reject.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;      // {scan, display} of the scan on screen
let tree = null;         // taxonomy tree for the picker
let levels = [];
let levelWords = [];
let previewUrl = null;

function showMessage(text, kind = "error") {
  const m = $("message");
  m.textContent = text;
  m.className = "message " + kind;
}
function clearMessage() { $("message").className = "message hidden"; }

function ids() { return { station: Settings.get("station"), operator: Settings.get("operator") }; }

function renderWho() {
  const { station, operator } = ids();
  $("who").textContent = (station || "no station") + " · " + (operator || "no operator");
}

// ---- settings ----------------------------------------------------------------------------------
function openSettings() {
  $("station").value = Settings.get("station");
  $("operator").value = Settings.get("operator");
  $("token").value = Settings.get("token");
  $("settings").showModal();
}
$("settings-btn").addEventListener("click", openSettings);
$("settings-form").addEventListener("submit", () => {
  Settings.set("station", $("station").value.trim());
  Settings.set("operator", $("operator").value.trim());
  Settings.set("token", $("token").value.trim());
  renderWho();
  loadInfo();
});

// ---- capture -----------------------------------------------------------------------------------
// Live camera needs a secure context (https or localhost); elsewhere the file input, which on a
// phone opens the camera app (capture="environment"), is the way in.
if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.isSecureContext) {
  $("camera-btn").classList.remove("hidden");
}
$("camera-btn").addEventListener("click", async () => {
  try {
    const stream = await navigator.mediaDevices.getUserMedia(
      { video: { facingMode: "environment", width: { ideal: 1280 } }, audio: false });
    $("video").srcObject = stream;
    $("camera-box").classList.remove("hidden");
    $("camera-btn").classList.add("hidden");
  } catch (e) {
    showMessage("camera unavailable (" + e.message + "); use “Take photo” instead", "warn");
  }
});
$("shoot").addEventListener("click", () => {
  const v = $("video");
  if (!v.videoWidth) { showMessage("the camera has no picture yet", "warn"); return; }
  const c = document.createElement("canvas");
  c.width = v.videoWidth; c.height = v.videoHeight;
  c.getContext("2d").drawImage(v, 0, 0);
  c.toBlob((blob) => blob && classify(blob, "camera.jpg"), "image/jpeg", 0.9);
});
$("file").addEventListener("change", (ev) => {
  const f = ev.target.files && ev.target.files[0];
  if (f) classify(f, f.name);
  ev.target.value = "";   // the same file can be chosen again
});

async function classify(blob, name) {
  clearMessage();
  $("result").classList.add("hidden");
  $("busy").classList.remove("hidden");
  const form = new FormData();
  form.append("image", blob, name);
  const { station, operator } = ids();
  form.append("station", station);
  form.append("operator", operator);
  try {
    const r = await api("/api/scans", { method: "POST", body: form });
    current = await r.json();
    current.photo = blob;  // a new product enrolled from this scan starts with this photo
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(blob);
    $("preview").src = previewUrl;
    renderResult();
  } catch (e) {
    showMessage(e.message);
    if (e.status === 401) openSettings();
  } finally {
    $("busy").classList.add("hidden");
  }
}

// ---- result ------------------------------------------------------------------------------------
const STATUS_TEXT = {
  complete: "Identified",
  backoff: "Partly identified",
  uncertain: "Uncertain",
  unknown: "Not in catalogue",
};

function renderResult() {
  const d = current.display;
  $("result").classList.remove("hidden");
  $("result").dataset.status = d.status;
  $("status").textContent = STATUS_TEXT[d.status] || d.status;
  $("status").className = "status " + d.status;
  $("headline").textContent = d.headline;
  const bc = $("breadcrumb");
  bc.replaceChildren();
  for (const c of d.crumbs) {
    bc.append(el("li", {}, el("span", { class: "crumb-label", text: c.label }),
                           el("span", { class: "conf", text: pct(c.probability) })));
  }
  if (d.status === "backoff") bc.append(el("li", { class: "unsure", text: d.next_level_word + "?" }));
  const cand = $("candidates");
  cand.replaceChildren();
  if (d.status !== "complete" && d.candidates.length) {
    cand.append(el("div", { class: "hint", text: d.status === "backoff" ? "Pick the " + d.next_level_word + ":" : "Closest guesses:" }));
    for (const c of d.candidates) {
      cand.append(el("button", { class: "btn cand", type: "button", onclick: () => act("corrected", c.path) },
        el("span", { text: c.path[c.path.length - 1] }), el("span", { class: "conf", text: pct(c.probability) })));
    }
  }
  $("confirm").disabled = !d.can_confirm;
  $("confirm").textContent = d.can_confirm ? "Confirm " + d.crumbs[d.crumbs.length - 1].label : "Confirm";
  for (const b of ["confirm", "correct", "reject"]) $(b).classList.remove("hidden");
  $("done").classList.add("hidden");
}

async function act(action, label) {
  if (!current) return;
  const body = Object.assign({ action }, ids());
  if (label) body.label = label;
  try {
    const r = await api("/api/scans/" + encodeURIComponent(current.scan.id) + "/action", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const { scan } = await r.json();
    current.scan = scan;
    const done = $("done");
    done.textContent = action === "rejected" ? "✗ Rejected — logged"
      : action === "confirmed" ? "✓ Confirmed: " + scan.final_path
      : "✓ Corrected to " + scan.final_path;
    done.className = "done " + action;
    $("candidates").replaceChildren();
    // Keep "Correct…" so a mis-tap can still be fixed; the log keeps every action.
    $("confirm").classList.add("hidden");
    $("reject").classList.add("hidden");
  } catch (e) {
    showMessage(e.message);
  }
}
$("confirm").addEventListener("click", () => act("confirmed"));
$("reject").addEventListener("click", () => act("rejected"));

// ---- tree picker -------------------------------------------------------------------------------
let pickPath = [];   // list of nodes chosen so far

function nodesAt(path) { return path.length ? path[path.length - 1].children : tree; }

function renderPicker() {
  $("picker-path").textContent = pickPath.length ? pickPath.map((n) => n.name).join(" › ") : "Choose " + levelWords[0];
  $("picker-back").disabled = pickPath.length === 0;
  const list = $("picker-list");
  list.replaceChildren();
  for (const n of nodesAt(pickPath)) {
    list.append(el("li", {}, el("button", { class: "btn pick", type: "button", onclick: () => {
      pickPath.push(n);
      if (!n.children.length) finishPick(); else renderPicker();
    } }, el("span", { text: n.name }), el("span", { class: "chev", text: n.children.length ? "›" : "" }))));
  }
  const use = $("picker-use");
  if (pickPath.length) {
    const unsure = levelWords[pickPath.length];
    use.textContent = "Use “" + pickPath[pickPath.length - 1].name + "”" + (unsure ? " — " + unsure + " unknown" : "");
    use.classList.remove("hidden");
  } else {
    use.classList.add("hidden");
  }
}
function finishPick() {
  const names = pickPath.map((n) => n.name);
  $("picker").close();
  act("corrected", names);
}
$("correct").addEventListener("click", async () => {
  try {
    if (!tree) await loadTree();
  } catch (e) { showMessage(e.message); return; }
  // Start from the deepest node the model was sure of: usually only the variety is left to pick.
  pickPath = [];
  let nodes = tree;
  for (const c of (current && current.display.status !== "unknown" ? current.display.crumbs : [])) {
    const n = nodes.find((x) => x.name === c.label);
    if (!n || !n.children.length) break;
    pickPath.push(n);
    nodes = n.children;
  }
  renderPicker();
  $("picker").showModal();
});
$("picker-back").addEventListener("click", () => { pickPath.pop(); renderPicker(); });
$("picker-close").addEventListener("click", () => $("picker").close());
$("picker-use").addEventListener("click", finishPick);

async function loadTree() {
  const r = await api("/api/taxonomy");
  const j = await r.json();
  tree = j.tree; levels = j.levels; levelWords = j.level_words || j.levels;
}

async function loadInfo() {
  try {
    const j = await (await api("/api/info")).json();
    $("model-info").textContent = "model " + j.model_sha256.slice(0, 12) + " · " + j.target + " " +
      (j.precision || "") + " · " + j.input_size + " px";
    clearMessage();
  } catch (e) {
    showMessage(e.message);
    if (e.status === 401) openSettings();
  }
}

renderWho();
loadInfo().then(() => {
  if (!Settings.get("station") || !Settings.get("operator")) {
    showMessage("Set your station and operator id in Settings so scans are logged to you.", "warn");
  }
});
