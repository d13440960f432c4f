// The log page: recent scans with filters, CSV export, labelled-dataset export; products enrolled and forgotten.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 50;
let offset = 0;
const thumbs = [];

function query() {
  const q = new URLSearchParams();
  for (const k of ["action", "label", "station", "operator"]) {
    const v = $("f-" + k).value.trim();
    if (v) q.set(k, v);
  }
  // Dates from the picker are whole days in UTC; `until` is inclusive of that day.
  if ($("f-since").value) q.set("since", $("f-since").value);
  if ($("f-until").value) {
    const d = new Date($("f-until").value + "T00:00:00Z");
    d.setUTCDate(d.getUTCDate() + 1);
    q.set("until", d.toISOString().slice(0, 10));
  }
  return q;
}

function when(iso) { return iso.replace("T", " ").slice(0, 19); }

function message(text, kind = "error") {
  $("message").textContent = text;
  $("message").className = "message " + kind;
}

async function thumb(img, id) {
  try {
    const blob = await (await api("/api/scans/" + encodeURIComponent(id) + "/image")).blob();
    const url = URL.createObjectURL(blob);
    thumbs.push(url);
    img.src = url;
  } catch (e) { img.alt = "image missing"; }
}

async function load(reset) {
  if (reset) {
    offset = 0;
    $("scans").replaceChildren();
    while (thumbs.length) URL.revokeObjectURL(thumbs.pop());
  }
  const q = query();
  q.set("limit", PAGE); q.set("offset", offset);
  try {
    const j = await (await api("/api/scans?" + q)).json();
    $("message").className = "message hidden";
    for (const s of j.scans) {
      const img = el("img", { alt: "" });
      const label = s.final_path || s.predicted_path || (s.is_unknown ? "unknown item" : "uncertain");
      const row = el("li", { class: "scan-row", "data-id": s.id }, img,
        el("div", {},
          el("div", { class: "label", text: label }),
          el("div", { class: "meta", text: when(s.created_at) + " · " + s.station + " · " + s.operator +
                                          " · " + Math.round(s.confidence * 100) + "%" }),
          el("span", { class: "tag " + (s.action || ""), text: s.action || "pending" })));
      $("scans").append(row);
      thumb(img, s.id);
    }
    offset += j.scans.length;
    $("total").textContent = offset + " of " + j.total + " scans";
    $("more").classList.toggle("hidden", offset >= j.total);
  } catch (e) {
    message(e.message);
  }
}

// Enrollment events (GET /api/enrollments), newest first: when, which product under which parent, from how
// many photos, who; a forgotten product is listed as such.
async function loadEvents() {
  try {
    const j = await (await api("/api/enrollments")).json();
    $("events").replaceChildren(...j.events.map((e) => el("li", { class: "scan-row event-row", "data-event": e.event },
      el("div", {},
        el("div", { class: "label" }, el("span", { class: "ev-label", text: e.label }), " under ",
          el("span", { class: "ev-parent", text: e.parent || "?" })),
        el("div", { class: "meta" }, el("span", { class: "ev-time", text: when(e.created_at) }),
          e.event === "enrolled" ? el("span", { class: "ev-photos", text: " · " + e.photos.length + " photos" }) : "",
          " · " + e.station + " · " + e.operator),
        el("span", { class: "tag " + e.event, text: e.event })))));
    $("events-empty").classList.toggle("hidden", j.events.length > 0);
  } catch (e) {
    message(e.message);
  }
}

$("filters").addEventListener("submit", (ev) => { ev.preventDefault(); load(true); });
$("more").addEventListener("click", () => load(false));
$("csv").addEventListener("click", async () => {
  try {
    const blob = await (await api("/api/export.csv?" + query())).blob();
    const a = el("a", { href: URL.createObjectURL(blob), download: "scans.csv" });
    document.body.append(a); a.click(); a.remove();
  } catch (e) { message(e.message); }
});
$("dataset").addEventListener("click", async () => {
  try {
    const j = await (await api("/api/export/dataset", { method: "POST" })).json();
    message("Wrote " + j.count + " labelled photos to " + j.relative + "/train.txt in the data folder" +
            (j.skipped ? " (" + j.skipped + " not labelled down to the finest level were left out)" : ""), "info");
  } catch (e) { message(e.message); }
});
load(true);
loadEvents();
