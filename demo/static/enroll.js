// "New product…" (from the Correct… picker): 5 photos + a name + the parent -> POST /api/enrollments,
// then the scan on screen is corrected to the new product. Uses app.js's globals (current, pickPath, act).
"use strict";

let enrollPhotos = [];   // Blobs; the scanned photo first
let enrollInfo = null;   // GET /api/enrollments: min/max photos, parents, can_enroll

function renderEnroll() {
  const min = enrollInfo ? enrollInfo.min_photos : 5;
  $("enroll-min").textContent = min;
  $("enroll-count").textContent = enrollPhotos.length;
  const thumbs = $("enroll-thumbs");
  for (const img of thumbs.querySelectorAll("img")) URL.revokeObjectURL(img.src);
  thumbs.replaceChildren(...enrollPhotos.map((b) => el("img", { src: URL.createObjectURL(b), alt: "product photo" })));
  $("enroll-save").disabled = enrollPhotos.length < min || !$("enroll-label").value.trim() || !$("enroll-parent").value;
}

async function openEnroll() {
  try {
    enrollInfo = await (await api("/api/enrollments")).json();
  } catch (e) { showMessage(e.message); return; }
  if (!enrollInfo.can_enroll) {
    showMessage("this model cannot learn new products (it has no embedding output); re-export it", "warn");
    return;
  }
  const sel = $("enroll-parent");
  sel.replaceChildren(el("option", { value: "", text: "choose the " + enrollInfo.parent_level }));
  // Preselect the parent the operator was looking at in the picker, else the model's own guess.
  const hint = pickPath.length > 1 ? pickPath[1].name
    : (current && current.display.crumbs.length > 1 ? current.display.crumbs[1].label : "");
  for (const path of enrollInfo.parents) {
    const name = path[path.length - 1];
    const opt = el("option", { value: name, text: path.join(" › ") });
    if (name === hint) opt.selected = true;
    sel.append(opt);
  }
  enrollPhotos = current && current.photo ? [current.photo] : [];
  $("enroll-label").value = "";
  $("picker").close();
  renderEnroll();
  $("enroll").showModal();
}

async function saveEnroll() {
  const form = new FormData();
  form.append("label", $("enroll-label").value.trim());
  form.append("parent", $("enroll-parent").value);
  const { station, operator } = ids();
  form.append("station", station);
  form.append("operator", operator);
  enrollPhotos.forEach((b, i) => form.append("photo", b, "photo" + i + ".jpg"));
  $("enroll-save").disabled = true;
  try {
    const j = await (await api("/api/enrollments", { method: "POST", body: form })).json();
    $("enroll").close();
    tree = null;  // the picker now shows the new product
    showMessage("Added " + j.path.join(" › ") + " — it is recognized from now on", "info");
    if (current) act("corrected", j.path);
  } catch (e) {
    showMessage(e.message);
    $("enroll").close();
  }
}

$("picker-new").addEventListener("click", openEnroll);
$("enroll-file").addEventListener("change", (ev) => {
  const max = enrollInfo ? enrollInfo.max_photos : 10;
  for (const f of ev.target.files || []) if (enrollPhotos.length < max) enrollPhotos.push(f);
  ev.target.value = "";
  renderEnroll();
});
$("enroll-label").addEventListener("input", renderEnroll);
$("enroll-parent").addEventListener("change", renderEnroll);
$("enroll-cancel").addEventListener("click", () => $("enroll").close());
$("enroll-save").addEventListener("click", saveEnroll);
