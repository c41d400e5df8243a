// finprint's web page: upload photos, compare each with its candidates, decide, browse.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
};
const imageUrl = (name) => "/images/" + encodeURIComponent(name);
const individualHref = (id) => "#/individual/" + encodeURIComponent(id);

// The token may come in the link the service printed (#token=...); it is kept in this browser.
(function takeTokenFromLink() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem("finprint.token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + "#/identify");
  }
})();
for (const id of ["token", "by"]) {
  const input = $("#" + id);
  input.value = localStorage.getItem("finprint." + id) || "";
  input.addEventListener("change", () => localStorage.setItem("finprint." + id, input.value.trim()));
}

function toast(message, bad = false) {
  const t = $("#toast");
  t.textContent = message;
  t.className = "toast" + (bad ? " bad" : "");
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), bad ? 8000 : 3000);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers);
  const token = $("#token").value.trim();
  if (token) headers.Authorization = "Bearer " + token;
  const res = await fetch(path, Object.assign({}, options, { headers }));
  const body = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

async function refreshHealth() {
  try {
    const h = await api("/api/health");
    $("#health").textContent = `${h.counts.individuals} individuals · ${h.counts.photos} photos`;
  } catch (e) {
    $("#health").textContent = "service unreachable";
  }
}

// ---- identify ----

function sightingForm() {
  const form = new FormData();
  for (const f of ["date", "place", "photographer"]) form.append(f, $("#" + f).value);
  return form;
}

async function identifyFiles(files) {
  files = [...files].filter((f) => f.size > 0);
  if (!files.length) return;
  const progress = $("#progress");
  progress.hidden = false;
  const show = (done, total) => {
    $(".bar", progress).style.width = `${(100 * done) / total}%`;
    $("span", progress).textContent = `${done} of ${total} photos identified`;
  };
  show(0, files.length);
  try {
    if (files.length === 1) {
      const form = sightingForm();
      form.append("photo", files[0], files[0].name);
      const result = await api("/api/identify", { method: "POST", body: form });
      renderResult({ upload: files[0].name, result });
      show(1, 1);
    } else {
      const form = sightingForm();
      for (const f of files) form.append("photo", f, f.name);
      const job = await api("/api/jobs", { method: "POST", body: form });
      let shown = 0;
      for (;;) {
        const s = await api(job.status);
        for (; shown < s.results.length; shown++) renderResult(s.results[shown]);
        show(s.done, s.total);
        if (s.finished) break;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  } catch (e) {
    toast(e.message, true);
  } finally {
    setTimeout(() => (progress.hidden = true), 1500);
    refreshHealth();
  }
}

renderResult.views = 0;
function renderResult(item) {
  const results = $("#results");
  if (item.error) {
    results.prepend(el("article", { class: "result failed" }, el("h3", {}, item.upload), el("p", { class: "error" }, item.error)));
    return;
  }
  const r = item.result;
  const card = el("article", { class: "result", "data-image": r.image });
  const status = el("div", { class: "status" });
  const decided = (record) => {
    card.classList.add("decided");
    status.replaceChildren(
      "Recorded: ",
      el("a", { href: individualHref(record.individual_id), "data-testid": "decided-link" }, record.individual_id),
      ` (${record.kind} by ${record.decided_by}, ${record.decided_at.replace("T", " ").slice(0, 19)} UTC)`,
    );
    card.querySelectorAll("button.confirm, button.new").forEach((b) => (b.disabled = true));
    refreshHealth();
  };
  const decide = async (decision) => {
    const by = $("#by").value.trim();
    if (!by) {
      toast("Enter your name first: every decision records who made it.", true);
      $("#by").focus();
      return;
    }
    try {
      decided(await api("/api/decisions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(Object.assign({ by, image: r.image }, decision)),
      }));
    } catch (e) {
      toast(e.message, true);
    }
  };

  const best = r.candidates.length ? r.candidates[0].score : null;
  const verdict = r.new_individual
    ? el("p", { class: "verdict new" }, "Probably a new individual", best === null ? "" : ` (best match ${best.toFixed(3)} is below ${r.threshold.toFixed(3)})`)
    : el("p", { class: "verdict known" }, `Best match scores ${best.toFixed(3)} (new-individual threshold ${r.threshold.toFixed(3)})`);
  const ranking = RANKED_BY[r.ranked_by] || RANKED_BY.embedding;
  const matchView = el("div", { class: "match-view", id: "matches-" + ++renderResult.views, hidden: "" });

  const query = el("div", { class: "query" },
    el("img", { src: imageUrl(r.image), alt: "query photo " + item.upload }),
    el("h3", {}, item.upload),
    verdict,
    status);

  const candidates = el("ol", { class: "candidates" }, r.candidates.map((c, i) =>
    el("li", { class: "candidate", "data-individual": c.individual_id },
      el("div", { class: "thumbs" }, c.photos.map((p, j) =>
        el("img", { src: imageUrl(p.image), class: j === 0 ? "main" : "", title: `${p.image}: ${p.score.toFixed(3)}`, alt: c.individual_id }))),
      el("div", { class: "meta" },
        el("span", { class: "rank" }, `#${i + 1}`),
        el("a", { href: individualHref(c.individual_id), class: "id" }, c.individual_id),
        el("span", { class: "score", title: ranking.score }, c.score.toFixed(3)),
        c.local ? el("span", { class: "marks", title: "keypoints of its best photo whose matches agree with one affine map" }, `${c.local.inliers} marks`) : null,
        c.species ? el("span", { class: "species" }, c.species.replaceAll("_", " ")) : null),
      el("button", { class: "confirm", "data-testid": "confirm", onclick: () => decide({ kind: "confirm", individual_id: c.individual_id }) }, `This is ${c.individual_id}`),
      c.photos.length ? el("button", {
        class: "show-matches", type: "button", "aria-expanded": "false", "aria-controls": matchView.id,
        onclick: (e) => toggleMatches(e.currentTarget, matchView, item.upload, r.image, c),
      }, "Show matches") : null,
    )));

  const newId = el("input", { placeholder: "new id (optional)", class: "new-id" });
  const actions = el("div", { class: "actions" },
    newId,
    el("button", { class: "new", "data-testid": "new", onclick: () => decide({ kind: "new", individual_id: newId.value.trim() || null }) }, "New individual"));

  if (r.individual_id) {
    decided({ individual_id: r.individual_id, kind: "already confirmed", decided_by: "earlier", decided_at: "" });
  }
  card.append(query, el("div", { class: "right" }, el("p", { class: "ranking" }, ranking.caption),
    candidates.childElementCount ? candidates : el("p", {}, "The catalogue has no confirmed photo yet."), matchView, actions));
  results.prepend(card);
}

// What ranks the candidates, as the service says (Identification.ranked_by).
const RANKED_BY = {
  embedding: { caption: "Ranked by the similarity of the whole photo.", score: "cosine similarity of its photo most like this one" },
  local: { caption: "Ranked by matching marks (local features) among the most similar photos.", score: "cosine similarity of its photo most like this one" },
  fused: { caption: "Ranked by the probability of the same animal (similarity and matching marks, calibrated).", score: "probability of the same animal, from its best photo" },
};

// The query beside a candidate's best photo, with a line between each pair of matching marks.
async function toggleMatches(button, view, upload, image, c) {
  const photo = c.local ? c.local.image : c.photos[0].image;
  const open = button.getAttribute("aria-expanded") === "true";
  button.closest(".candidates").querySelectorAll("button.show-matches").forEach((b) => {
    b.setAttribute("aria-expanded", "false");
    b.textContent = "Show matches";
  });
  if (open) {
    view.hidden = true;
    return;
  }
  button.setAttribute("aria-expanded", "true");
  button.textContent = "Hide matches";
  view.hidden = false;
  view.replaceChildren(el("p", { class: "hint" }, "Matching marks…"));
  let m;
  try {
    m = await api(`/api/matches?query=${encodeURIComponent(image)}&photo=${encodeURIComponent(photo)}`);
  } catch (e) {
    view.replaceChildren(el("p", { class: "error" }, e.message));
    return;
  }
  const marks = `${m.verified} matching mark${m.verified === 1 ? "" : "s"}`;
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "lines");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${marks}: lines between the same marks in both photos`);
  const left = el("img", { src: imageUrl(image), alt: "query photo " + upload });
  const right = el("img", { src: imageUrl(photo), alt: `${c.individual_id}: photo ${photo}` });
  const pair = el("div", { class: "pair" }, left, right, svg);
  const draw = () => {
    const box = pair.getBoundingClientRect();
    const [a, b] = [left.getBoundingClientRect(), right.getBoundingClientRect()];
    svg.setAttribute("viewBox", `0 0 ${box.width} ${box.height}`);
    const at = (rect, [x, y]) => [rect.left - box.left + x * rect.width, rect.top - box.top + y * rect.height];
    svg.replaceChildren(...m.lines.flatMap((l) => {
      const [[x1, y1], [x2, y2]] = [at(a, l.query), at(b, l.candidate)];
      const line = document.createElementNS(svgNS, "line");
      Object.entries({ x1, y1, x2, y2 }).forEach(([k, v]) => line.setAttribute(k, v.toFixed(1)));
      const ends = [[x1, y1], [x2, y2]].map(([cx, cy]) => {
        const dot = document.createElementNS(svgNS, "circle");
        Object.entries({ cx, cy, r: 2.5 }).forEach(([k, v]) => dot.setAttribute(k, String(v)));
        return dot;
      });
      return [line, ...ends];
    }));
  };
  for (const img of [left, right]) img.addEventListener("load", draw);
  new ResizeObserver(draw).observe(pair);
  view.replaceChildren(el("figure", { class: "matches" },
    pair,
    el("figcaption", { "data-testid": "match-count" },
      m.verified ? `${marks} between this photo and ${c.individual_id}'s ${photo}` : `No matching marks found between this photo and ${c.individual_id}'s ${photo}`)));
}

const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); identifyFiles(e.dataTransfer.files); });
$("#files").addEventListener("change", (e) => { identifyFiles(e.target.files); e.target.value = ""; });

// ---- individuals ----

let allIndividuals = [];
async function showIndividuals() {
  allIndividuals = await api("/api/individuals");
  renderIndividuals();
}
function renderIndividuals() {
  const q = $("#filter").value.trim().toLowerCase();
  const list = allIndividuals.filter((i) => !q || i.id.toLowerCase().includes(q) || i.species.toLowerCase().includes(q));
  $("#count").textContent = `${list.length} of ${allIndividuals.length}`;
  $("#individuals").replaceChildren(...list.slice(0, 500).map((i) =>
    el("a", { class: "tile", href: individualHref(i.id) },
      i.cover ? el("img", { src: imageUrl(i.cover), alt: i.id, loading: "lazy" }) : el("div", { class: "noimg" }),
      el("strong", {}, i.id),
      el("span", {}, `${i.photos} photo${i.photos === 1 ? "" : "s"}${i.species ? " · " + i.species.replaceAll("_", " ") : ""}`))));
}
$("#filter").addEventListener("input", renderIndividuals);

async function showIndividual(id) {
  const box = $("#individual");
  box.replaceChildren(el("p", {}, "Loading…"));
  try {
    const d = await api("/api/individuals/" + encodeURIComponent(id));
    box.replaceChildren(
      el("h2", { "data-testid": "individual-id" }, d.id),
      el("p", { class: "facts" },
        d.species ? d.species.replaceAll("_", " ") + " · " : "",
        `${d.photos} sighting${d.photos === 1 ? "" : "s"} · catalogued ${d.created_at.slice(0, 10)} by ${d.created_by}`,
        d.aliases.length ? ` · also known as ${d.aliases.join(", ")}` : "",
        d.requested ? ` · ${d.requested} was merged into it` : ""),
      el("h3", {}, "Sightings"),
      el("div", { class: "sightings" }, d.sightings.map((s) =>
        el("figure", { class: "sighting-card", "data-image": s.image },
          el("img", { src: imageUrl(s.image), alt: s.image, loading: "lazy" }),
          el("figcaption", {},
            el("strong", {}, s.date || "date not given"),
            el("span", {}, s.place || "place not given"),
            el("span", {}, s.photographer ? "by " + s.photographer : "photographer not given"),
            el("small", {}, `${s.image} · added ${s.added_at.slice(0, 10)}`))))),
      el("h3", {}, "History"),
      el("table", { class: "history" },
        el("tr", {}, ["#", "decision", "photo", "individual", "other", "by", "when", "note"].map((h) => el("th", {}, h))),
        d.history.slice(-200).reverse().map((h) =>
          el("tr", {}, [h.seq, h.kind, h.image, h.individual_id, h.other_id, h.decided_by, h.decided_at.replace("T", " ").slice(0, 19), h.note].map((v) => el("td", {}, v))))),
    );
  } catch (e) {
    box.replaceChildren(el("p", { class: "error" }, e.message));
  }
}

// ---- routing ----

function route() {
  const hash = location.hash || "#/identify";
  const [, view, arg] = hash.match(/^#\/([a-z]+)\/?(.*)$/) || [null, "identify", ""];
  const name = ["identify", "individuals", "individual"].includes(view) ? view : "identify";
  for (const v of ["identify", "individuals", "individual"]) $("#view-" + v).hidden = v !== name;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === (name === "individual" ? "individuals" : name)));
  if (name === "individuals") showIndividuals().catch((e) => toast(e.message, true));
  if (name === "individual") showIndividual(decodeURIComponent(arg));
}
window.addEventListener("hashchange", route);
route();
refreshHealth();
