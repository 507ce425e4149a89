// The web UI's script (a file: the page's Content-Security-Policy allows no inline script).
const $ = (id) => document.getElementById(id);
let last = null, queryCase = null, queryFile = null, queryUid = null;
let queryToken = 0;  // the latest query's number: only its result is shown
// A region drawn on the query scan to search by: {kind: "box" | "outline", points: [[x, y], ...]} in
// the scan's own pixels; the scan's size ([rows, columns], from its last answer); the region fields
// of the answer shown (the similarity maps of a region search read the region too).
let region = null, scanSize = null, searchedRegion = null;

async function api(path, opts) {
  const r = await fetch(path, opts);
  const body = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  return body;
}

// Sign-in: with access control on, the page asks for an API token (or sends the user to the
// hospital's identity provider); either way the server sets an HttpOnly session cookie.
async function signIn() {
  const auth = await (await fetch("/auth/config")).json();
  if (auth.mode === "none") return true;
  $("signin").hidden = false;
  if (auth.user) {
    $("who").textContent = `Signed in as ${auth.user.name} (${auth.user.role}). `;
    $("logout").hidden = false;
    return true;
  }
  $("who").textContent = "Sign in to see cases. ";
  document.querySelector("main").hidden = true;  // nothing about cases before sign-in
  if (auth.mode === "oidc") $("oidcLogin").hidden = false; else $("tokenForm").hidden = false;
  return false;
}

$("tokenForm").onsubmit = async (e) => {
  e.preventDefault();
  const r = await fetch("/auth/session", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token: $("token").value})});
  if (r.ok) location.reload();
  else $("signinError").textContent = (await r.json().catch(() => ({detail: r.statusText}))).detail;
};
$("logout").onclick = async () => { await fetch("/auth/logout", {method: "POST"}); location.reload(); };

async function init() {
  if (!(await signIn())) return;  // nothing else is shown before sign-in
  const health = await (await fetch("/health")).json();  // 503 while the archive cannot be served
  if (health.archive_problem) $("error").textContent = health.archive_problem;
  $("pacsRow").hidden = !health.pacs;
  const ex = await api("/examples");
  $("disclaimer").textContent = ex.disclaimer;
  $("exampleRow").hidden = !ex.examples.length;  // an archive has no held-out examples
  for (const e of ex.examples) {
    const o = document.createElement("option");
    o.value = e.case_id; o.textContent = `case ${e.case_id} (${{notumor: "no tumor", tumor: "tumor, type not given"}[e.label] || e.label})`;
    $("example").appendChild(o);
  }
  for (const q of ex.questions) {
    const b = document.createElement("button");
    b.textContent = q; b.onclick = () => { $("question").value = q; ask(); };
    $("suggest").appendChild(b);
  }
}

// One scan's result on screen at a time: cleared before a query, so a failed one shows its error
// alone, not the previous scan's evidence beside the new image.
function clearResult() {
  last = null;
  for (const id of ["predBox", "galleryBox", "summaryBox", "chatBox", "compare", "studyBox"]) $(id).hidden = true;
  $("tumorSvg").replaceChildren(); $("tumor").textContent = "";
  $("heatQuery").hidden = true; $("heatNote").textContent = "";
  scanSize = null; searchedRegion = null; drawRegion();  // a drawn region waits, hidden, for its scan's answer
}

async function runQuery(byRegion = false) {
  $("error").textContent = "";
  const fd = new FormData();
  const f = $("file").files[0];
  const uid = $("pacsUid").value.trim();
  if (!f && !uid && !$("example").value) {
    $("error").textContent = "Choose a file, an example case or a PACS instance."; return;
  }
  const regionFields = byRegion && region && scanSize ? await regionForm() : null;
  clearResult();
  const token = ++queryToken, current = () => token === queryToken;
  $("status").textContent = "Searching the archive…";
  queryCase = null; queryFile = f || null; queryUid = null;
  if (f) { fd.append("file", f); $("queryImg").src = URL.createObjectURL(f); }
  else if (uid) {
    queryUid = uid; fd.append("instance_uid", uid);
    $("queryImg").src = `/pacs/image.png?instance_uid=${encodeURIComponent(uid)}`;
  } else if ($("example").value) {
    queryCase = parseInt($("example").value);
    fd.append("case_id", queryCase);
    $("queryImg").src = `/cases/${queryCase}/image.png?size=512`;
  }
  if (regionFields) for (const [key, value] of regionFields) fd.append(key, ...value);
  try {
    const params = new URLSearchParams({k: $("k").value, one_per_patient: $("dedup").checked, rerank: $("rerank").checked});
    for (const [key, id] of [["plane", "fPlane"], ["tumor_type", "fType"], ["min_area_mm2", "fMin"], ["max_area_mm2", "fMax"]])
      if ($(id).value !== "") params.set(key, $(id).value);
    const out = await api(`/query?${params}`, {method: "POST", body: fd}).finally(() => handled("query"));
    if (!current()) return;  // a later query was started: its result is the one to show
    last = out; scanSize = out.image_size; searchedRegion = out.region ? regionFields : null;
  } catch (e) {
    if (current()) { $("status").textContent = ""; $("error").textContent = e.message; }
    return;
  }
  $("status").textContent = "";
  showPrediction(); showTumor(); drawRegion();
  try { await showGallery(); } catch (e) { if (current()) $("error").textContent = e.message; }
  if (!current() || last.tumor_found === false) return;  // reports and chat are about the tumors
  await showSummary();
  if (!current()) return;
  $("chatBox").hidden = false; $("chatLog").replaceChildren();
}

// Every string from the server goes in as text, never as HTML: reports come from cases.csv
// files and LLMs, and a report must not be able to run script in a clinician's browser.
function el(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (className) e.className = className;
  return e;
}

function cell(row, text, tag = "td") { row.appendChild(el(tag, text)); }

function showPrediction() {
  $("predBox").hidden = false;
  const r = last.region;
  $("regionAnswer").hidden = !r;
  $("regionAnswer").textContent = r ? `Searched by the drawn region (${r.kind === "box" ? "rectangle " + r.box.join(",")
    : "free outline"}, ${r.pixels} pixels of the scan), not the whole slice: the prediction, its confidence and the ` +
    "retrieved cases are about the region; the slice's own predicted tumor outline stays in yellow for context." : "";
  $("far").hidden = !last.no_similar_case;
  const dup = last.already_in_archive;
  $("already").hidden = !dup;
  $("already").textContent = dup ? `This scan is already in the archive as case ${dup.case_id}` +
    `${dup.mirrored ? " (mirrored left-right)" : ""}: that case is shown but not counted as evidence.` : "";
  const none = last.tumor_found === false, p = last.tumor_presence;
  $("noTumor").hidden = !none; $("typeAnswer").hidden = none;
  const blind = r && p && p.located === false;  // the tumor map outlines nothing: the slice's answer decides
  const slice = blind && p.on_slice ? (last.tumor_found === null
    ? `tumor presence on the slice is ${p.on_slice.note}`
    : `the slice's evidence says a tumor is present (probability of no tumor ${(100 * p.on_slice.probability_no_tumor).toFixed(1)}%)`) : "";
  $("presence").textContent = blind && !none
    ? `The tumor map outlines no tumor anywhere on this slice, so it cannot tell whether a tumor lies in the drawn region; ` +
      `${slice}. Read the answer as the region's nearest cases, not as proof that a tumor is inside it.`
    : last.tumor_found === null ? `Tumor presence ${p.note}.` : "";
  $("noTumorTitle").textContent = r && !blind ? "No tumor found in the drawn region" : "No tumor found on this slice";
  if (none && blind) {
    $("noTumorWhy").textContent = `The tumor map outlines no tumor anywhere on this slice, and the slice's evidence says there is none ` +
      `(probability of no tumor ${(100 * p.on_slice.probability_no_tumor).toFixed(1)}%). No tumor type is given; the archive cases most similar to the region are shown as context.`;
    return;
  }
  if (none && r) {
    $("noTumorWhy").textContent = `The ${p.decoder || "tumor"} decoder's highest probability inside the region is ${(100 * p.probability_tumor_in_region).toFixed(1)}% ` +
      `(a tumor from ${(100 * p.threshold).toFixed(0)}%; ${p.note}). No tumor type is given; the archive cases most similar to the region are shown as context.`;
    return;
  }
  if (none) {
    const peak = p.decoder_peak == null ? "" : `, the ${p.decoder || "tumor"} decoder's highest probability ${(100 * p.decoder_peak).toFixed(1)}%`;
    $("noTumorWhy").textContent = `Probability of no tumor ${(100 * p.probability_no_tumor).toFixed(1)}%${peak} (${p.note}). ` +
      "The archive's answer is about tumor type only, so no tumor type is given; the most similar archive cases are shown as context.";
    return;
  }
  const distant = last.no_close_tumor_case;  // the nearest typed cases all lie far: the type is their vote
  $("distant").hidden = !distant; $("distant").textContent = distant ? distant.warning : "";
  $("uncertain").hidden = !last.presence_warning;  // presence evidence in conflict: the type is conditional
  $("uncertain").textContent = last.presence_warning || "";
  const chip = document.createElement("span");
  chip.className = `chip ${last.prediction}`; chip.textContent = last.prediction;
  $("pred").replaceChildren(chip);
  const ic = last.nir_positions[last.prediction];
  const kind = last.calibrated ? "calibrated confidence" : "uncalibrated confidence";
  // Far from every archive case, or from every typed one, a calibrated probability would not hold: show none.
  const withheld = last.no_similar_case || distant;
  $("conf").textContent = (last.presence_warning ? "if it is a tumor: " : "") + (withheld
    ? `confidence withheld (${last.no_similar_case ? "no similar archive case" : "no close tumor case"}) — `
    : `${kind} ${(100 * last.confidence).toFixed(1)}% — `) + (ic === 1
    ? `the nearest archive case is a ${last.prediction}; the second is not`
    : `the ${ic} nearest archive cases are all ${last.prediction}`);
  $("set").textContent = last.prediction_set
    ? `${Math.round(100 * last.coverage)}% prediction set: ${last.prediction_set.join(" or ")}`
    : "No prediction set: this run was trained without calibration.";
  $("disagree").hidden = !last.neighbours_disagree;
  const votes = Object.entries(last.knn_vote).sort((a, b) => b[1] - a[1]);
  $("disagree").textContent = votes[0][0] !== last.prediction
    ? `The neighbours disagree: most of the 7 nearest cases are ${votes[0][0]}, the nearest-incorrect rule says ${last.prediction}. Read the retrieved cases.`
    : `The evidence does not single out one tumor type: at ${Math.round(100 * last.coverage)}% coverage it allows ${(last.prediction_set || []).join(" or ")}. Read the retrieved cases.`;
  const o = last.nearest_other_class;
  $("contrast").textContent = o
    ? `Nearest case of another class: case ${o.case_id}, a ${o.label}, at distance ${o.distance.toFixed(3)} (rank ${o.rank}).`
    : "";
  const table = $("probs"); table.replaceChildren();
  const head = table.insertRow();
  for (const h of ["class", last.calibrated ? "probability (calibrated)" : "softmax(I_c)", "I_c", "KNN-7 vote"]) cell(head, h, "th");
  for (const c of Object.keys(last.probabilities)) {
    const r = table.insertRow();
    cell(r, c); cell(r, withheld ? "—" : `${(100 * last.probabilities[c]).toFixed(1)}%`);
    cell(r, last.nir_positions[c]);
    cell(r, `${(100 * (last.knn_vote[c] || 0)).toFixed(0)}%`);
  }
}

// Side by side: the query and one retrieval with the same zoom and window / level (on the 8-bit
// display pixels); every control has a key, and the panes scroll together.
const cmpImages = {query: null, case: null};

function loadImage(src) {
  return new Promise((ok, fail) => { const im = new Image(); im.onload = () => ok(im); im.onerror = fail; im.src = src; });
}

function drawCompare() {
  const zoom = parseFloat($("cmpZoom").value), level = +$("cmpLevel").value, width = +$("cmpWidth").value;
  $("cmpZoomV").textContent = `${zoom}x`;
  // at 1x both scans fit side by side in the panes (at most 480 px wide); zoom scrolls inside them
  const fit = Math.min(480, Math.floor(($("paneQ").parentElement.clientWidth - 12) / 2));
  for (const [key, id] of [["query", "cmpQuery"], ["case", "cmpCase"]]) {
    const im = cmpImages[key]; if (!im) continue;
    // the scan's own pixels (at most 512 on a side), so zooming in shows detail, not blocks
    const scale = Math.min(1, 512 / Math.max(im.naturalWidth, im.naturalHeight));
    const w = Math.max(1, Math.round(im.naturalWidth * scale)), h = Math.max(1, Math.round(im.naturalHeight * scale));
    const c = $(id), ctx = c.getContext("2d", {willReadFrequently: true});
    c.width = w; c.height = h;
    c.style.width = `${fit * zoom}px`; c.style.height = `${fit * zoom * h / w}px`;
    ctx.drawImage(im, 0, 0, w, h);
    const px = ctx.getImageData(0, 0, w, h), d = px.data, lo = level - width / 2;
    for (let j = 0; j < d.length; j += 4) {
      const v = Math.max(0, Math.min(255, ((d[j] - lo) / width) * 255));
      d[j] = d[j + 1] = d[j + 2] = v;
    }
    ctx.putImageData(px, 0, 0);
  }
}

// Every answer the page has dealt with (shown, or dropped as stale), counted per kind on <body>
// (data-query, data-similarity, data-ask, data-compare): what automation waits on, not a timer.
function handled(kind) { document.body.dataset[kind] = String(Number(document.body.dataset[kind] || 0) + 1); }

async function openCompare(i, caseId) {
  const shown = last;
  let pair;
  try { pair = await Promise.all([loadImage($("queryImg").src), loadImage(`/cases/${Number(caseId)}/image.png?size=512`)]); }
  finally { handled("compare"); }
  const [query, image] = pair;
  if (shown !== last) return;  // a new query started meanwhile: this pair is no longer on screen
  cmpImages.query = query; cmpImages.case = image;
  $("cmpTitle").textContent = `retrieval #${i + 1} (case ${caseId})`;
  $("compare").hidden = false; drawCompare(); $("compare").focus();
}

for (const id of ["cmpZoom", "cmpLevel", "cmpWidth"]) $(id).oninput = drawCompare;
window.addEventListener("resize", () => { if (!$("compare").hidden) drawCompare(); });
$("cmpClose").onclick = () => { $("compare").hidden = true; };
$("paneQ").onscroll = () => { $("paneC").scrollTop = $("paneQ").scrollTop; $("paneC").scrollLeft = $("paneQ").scrollLeft; };
$("compare").addEventListener("keydown", (e) => {
  const step = (id, by) => { const s = $(id); s.value = Math.max(+s.min, Math.min(+s.max, +s.value + by)); drawCompare(); };
  const keys = {"+": () => step("cmpZoom", 0.5), "=": () => step("cmpZoom", 0.5), "-": () => step("cmpZoom", -0.5),
    ArrowLeft: () => step("cmpLevel", -8), ArrowRight: () => step("cmpLevel", 8),
    ArrowUp: () => step("cmpWidth", 16), ArrowDown: () => step("cmpWidth", -16),
    Escape: () => { $("compare").hidden = true; }};
  if (keys[e.key] && !(e.target instanceof HTMLInputElement && e.key.startsWith("Arrow"))) { keys[e.key](); e.preventDefault(); }
});

// Clinician feedback: a relevant / not relevant mark on one retrieval, stored by the server.
async function sendFeedback(caseId, relevant, said) {
  try {
    await api("/feedback", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({query_fingerprint: last.query_fingerprint, case_id: caseId, relevant})});
    said.textContent = relevant ? "marked relevant" : "marked not relevant";
  } catch (e) { said.textContent = e.message; }
}

// Why similar: heat maps of what brings the query and retrieval #i together, over both images.
async function similarityMap(caseId, side) {
  const fd = new FormData();
  if (queryFile) fd.append("file", queryFile);
  else if (queryUid) fd.append("instance_uid", queryUid);
  else fd.append("query_case_id", queryCase);
  if (searchedRegion) for (const [key, value] of searchedRegion) fd.append(key, ...value);
  const r = await fetch(`/similarity?case_id=${Number(caseId)}&side=${side}`, {method: "POST", body: fd});
  if (!r.ok) throw new Error((await r.json().catch(() => ({detail: r.statusText}))).detail);
  return {url: URL.createObjectURL(await r.blob()), lesionShare: r.headers.get("X-Lesion-Share")};
}

let simToken = 0;  // the latest "Why similar?" click: only its maps are drawn

async function showSimilarity(i, caseId, heat) {
  const token = ++simToken, shown = last;
  // one pair of maps at a time: the last pair goes now, not when these arrive (the note names #i)
  for (const h of document.querySelectorAll(".card .heat")) h.hidden = true;
  $("heatQuery").hidden = true;
  $("heatNote").textContent = `Computing why retrieval #${i + 1} is similar (a second or two)...`;
  try {
    const [q, c] = await Promise.all([similarityMap(caseId, "query"), similarityMap(caseId, "case")]);
    // a later click, or a new query, came first: these maps belong to a view no longer shown
    if (token !== simToken || shown !== last) return;
    $("heatQuery").src = q.url; $("heatQuery").hidden = false;
    heat.src = c.url; heat.hidden = false;
    const share = q.lesionShare === null ? "" : ` ${Math.round(100 * Number(q.lesionShare))}% of this similarity comes from ` +
      `the tumor's features, ${100 - Math.round(100 * Number(q.lesionShare))}% from the whole slice around it.`;
    $("heatNote").textContent = `Heat: the regions that make the query and retrieval #${i + 1} (case ${caseId}) similar to the model.${share}`;
  } catch (e) { if (token === simToken && shown === last) $("heatNote").textContent = e.message; }
  finally { handled("similarity"); }
}

// The query's own tumor, as the model outlines it (drawn over the scan in its pixel grid).
function showTumor() {
  const svg = $("tumorSvg"), t = last.query_tumor;
  svg.replaceChildren();
  $("tumor").className = last.tumor_found === false && !last.region ? "pred" : "";  // a region's "no tumor" is said above
  if (!t) {
    $("tumor").textContent = last.tumor_found === false && !last.region ? "No tumor found on this slice."
      : last.tumor_outlining ? "No tumor outlined by the model on this scan." : "";
    return;
  }
  svg.setAttribute("viewBox", `0 0 ${t.image_size[1]} ${t.image_size[0]}`);
  const poly = document.createElementNS("http://www.w3.org/2000/svg", "polygon");
  poly.setAttribute("points", t.outline.map(p => p.join(",")).join(" "));
  svg.appendChild(poly);
  $("tumor").textContent = `Predicted tumor outline (yellow): about ${t.area_mm2.toFixed(0)} mm² (${t.note}).`;
}

async function showGallery() {
  const shown = last;  // the cases' reports are fetched together, then drawn only if still current
  const infos = await Promise.all(shown.retrievals.map(r => api(`/cases/${r.case_id}?style=${$("style").value}`)));
  if (shown !== last) return;
  $("galleryBox").hidden = false;
  const g = $("gallery"); g.replaceChildren();
  if (shown.filters) g.append(el("p", "Filtered retrievals; the prediction reads the whole archive."));
  if (!shown.retrievals.length) g.append(el("p", "No archive case passes these filters."));
  for (const [i, r] of shown.retrievals.entries()) {
    const c = infos[i];
    const d = el("div", undefined, "card retrieval");
    const img = el("img"); img.src = `/cases/${Number(r.case_id)}/image.png?outline=true`; img.alt = `case ${r.case_id}`;
    const wrap = el("div", undefined, "imgWrap"), heat = el("img", undefined, "heat");
    heat.hidden = true; heat.alt = ""; wrap.append(img, heat);
    const cmp = el("button", "Compare");
    cmp.onclick = () => openCompare(i, r.case_id);
    const why = el("button", "Why similar?");
    why.onclick = () => showSimilarity(i, r.case_id, heat);
    const marks = el("div"), said = el("span");
    for (const [text, relevant] of [["Relevant", true], ["Not relevant", false]]) {
      const b = el("button", text);
      b.onclick = () => sendFeedback(r.case_id, relevant, said);
      marks.append(b, " ");
    }
    marks.append(said);
    const title = el("div");
    const shown = {notumor: "no tumor", tumor: "tumor, type not given"}[r.label] || r.label;
    title.append(el("b", `#${i + 1}`), " ", el("span", shown, `chip ${r.label}`), ` ${r.plane || ""}`);
    if (r.same_image_as_query) title.append(" ", el("span", "the query itself: not counted as evidence", "warn"));
    d.append(wrap, title,
      el("div", `size ${r.area_mm2 == null ? "unknown" : r.area_mm2.toFixed(1) + " mm²"} · distance ${r.distance.toFixed(3)}`),
      el("div", `Report ${i + 1}: ${c.report || "(no report)"}`, "report"), cmp, " ", why, marks);
    g.appendChild(d);
  }
}

function casesBody(extra) {
  const area = queryCase === null && last.query_tumor ? last.query_tumor.area_mm2 : null;
  return JSON.stringify(Object.assign({case_ids: last.retrievals.map(r => r.case_id), query_case_id: queryCase,
                                       query_tumor_area_mm2: area, style: $("style").value}, extra || {}));
}

async function showSummary() {
  const shown = last;
  let text;
  try {
    text = (await api("/summary", {method: "POST", headers: {"Content-Type": "application/json"}, body: casesBody()})).summary;
  } catch (e) { text = e.message; }
  if (shown !== last) return;
  $("summaryBox").hidden = false; $("summary").textContent = text;
}

async function ask() {
  const q = $("question").value.trim(); if (!q || !last) return;
  const div = document.createElement("div"), shown = last;
  try {
    const a = await api("/ask", {method: "POST", headers: {"Content-Type": "application/json"}, body: casesBody({question: q})});
    div.append(el("div", `Q: ${q}`, "q"), el("div", `A: ${a.answer}`, "answer"));
  } catch (e) { div.append(el("div", `Q: ${q}`, "q"), el("div", e.message, "warn")); }
  if (shown === last) $("chatLog").prepend(div);  // an answer about an earlier scan's cases is dropped
  handled("ask");
}

$("run").onclick = () => runQuery();

// A whole series: one answer for the study first, then its slices (a tumor marked), the key slice
// large with its outline, and the most similar archive patients; the summary and the chat read
// those patients' reports.
async function runStudy() {
  $("error").textContent = "";
  const files = $("studyFiles").files;
  if (!files.length) { $("error").textContent = "Choose the series' files."; return; }
  clearResult();
  const token = ++queryToken;
  $("status").textContent = `Answering the study (${files.length} files)…`;
  const fd = new FormData();
  for (const f of files) fd.append("files", f);
  let out;
  try { out = await api(`/query/study?k=${$("k").value}&thumbnails=true`, {method: "POST", body: fd}); }
  catch (e) { if (token === queryToken) { $("status").textContent = ""; $("error").textContent = e.message; } return; }
  if (token !== queryToken) return;
  $("status").textContent = "";
  $("queryImg").removeAttribute("src");
  $("studyBox").hidden = false;
  const pred = $("studyPred");
  $("studyUncertain").hidden = !out.presence_warning; $("studyUncertain").textContent = out.presence_warning || "";
  $("studyDistant").hidden = !out.no_close_tumor_case; $("studyDistant").textContent = out.no_close_tumor_case || "";
  if (out.prediction) {
    pred.replaceChildren(el("span", out.prediction, `chip ${out.prediction}`));
    $("studyConf").textContent = `confidence ${(100 * out.confidence).toFixed(1)}% (${out.calibrated || "uncalibrated"}), ` +
      `from the ${out.tumor_slices.length} of ${out.n_slices} slices that show a tumor`;
    $("studySize").textContent = (out.largest_area_mm2 === null ? "no tumor outlined" :
      `largest outlined area about ${Math.round(out.largest_area_mm2)} mm²`) +
      (out.area_note ? ` (${out.area_note})` : "") +
      (out.volume_ml !== null ? `; volume about ${out.volume_ml.toFixed(1)} ml (${out.volume_note})` : "");
  } else {
    pred.textContent = out.tumor_found === false ? "No tumor found on this study" : "No tumor type for this study";
    $("studyConf").textContent = out.note; $("studySize").textContent = "";
  }
  const strip = $("strip"); strip.replaceChildren();
  for (const s of out.slices) {
    const fig = el("figure", undefined, s.tumor_found === false ? "" : "tumor");
    fig.dataset.name = s.name;
    if (out.key_slice && s.index === out.key_slice.index) fig.classList.add("key");
    const img = el("img"); img.src = s.thumbnail; img.alt = `slice ${s.index + 1}`;
    // ● a tumor; ? a tumor only by the decoder's veto (its presence uncertain)
    fig.append(img, el("figcaption", s.tumor_found === false ? `${s.index + 1}`
      : `${s.index + 1} ${s.presence_uncertain ? "?" : "●"}`));
    // a slice of its own file opens as the query: then a region of it can be drawn and searched
    const file = Array.from(files).find(f => f.name === s.name);
    if (file) {
      fig.tabIndex = 0; fig.title = "open this slice as the query (to search a region of it)";
      fig.onclick = () => openSliceAsQuery(file);
      fig.onkeydown = (e) => { if (e.key === "Enter") openSliceAsQuery(file); };
    }
    strip.appendChild(fig);
  }
  const svg = $("keySvg"); svg.replaceChildren();
  if (out.key_slice) {
    $("keyImg").src = out.key_image;
    const t = out.slices[out.key_slice.index].query_tumor;
    if (t) {
      svg.setAttribute("viewBox", `0 0 ${t.image_size[1]} ${t.image_size[0]}`);
      const poly = document.createElementNS("http://www.w3.org/2000/svg", "polygon");
      poly.setAttribute("points", t.outline.map(p => p.join(",")).join(" ")); svg.appendChild(poly);
    }
    $("keyNote").textContent = `Key slice ${out.key_slice.index + 1} (${out.key_slice.name}), the largest outlined tumor.`;
  }
  const g = $("patients"); g.replaceChildren();
  for (const p of out.patients) {
    const d = el("div", undefined, "card");
    const img = el("img"); img.src = `/cases/${Number(p.case_id)}/image.png?outline=true`; img.alt = `case ${p.case_id}`;
    d.append(img, el("div", `#${p.rank} ${p.label}, distance ${p.distance.toFixed(3)}`));
    g.appendChild(d);
  }
  if (out.patients.length) {  // the summary and the chat work on the similar patients' reports
    last = {retrievals: out.patients, query_tumor: null, tumor_found: out.tumor_found};
    queryCase = null;
    await showSummary();
    if (token === queryToken) { $("chatBox").hidden = false; $("chatLog").replaceChildren(); }
  }
}
$("runStudy").onclick = runStudy;

function openSliceAsQuery(file) {
  const dt = new DataTransfer(); dt.items.add(file);
  $("file").files = dt.files; clear("example", "pacsUid"); clearRegion();
  runQuery();
}
// One source at a time: choosing a file, an example or a PACS instance clears the other two, so
// the scan queried is the one chosen last.
const clear = (...ids) => { for (const id of ids) $(id).value = ""; };
$("file").onchange = () => { clear("example", "pacsUid"); clearRegion(); };
$("example").onchange = () => { clear("file", "pacsUid"); clearRegion(); };
$("pacsUid").oninput = () => { clear("file", "example"); clearRegion(); };
// A scan dropped on the query panel becomes the query and runs.
const panel = $("queryPanel");
panel.addEventListener("dragover", (e) => { e.preventDefault(); panel.classList.add("dropping"); });
panel.addEventListener("dragleave", () => panel.classList.remove("dropping"));
panel.addEventListener("drop", (e) => {
  e.preventDefault(); panel.classList.remove("dropping");
  if (!e.dataTransfer.files.length) return;
  $("file").files = e.dataTransfer.files; clear("example", "pacsUid"); clearRegion(); runQuery();
});
$("ask").onclick = ask;
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter") ask(); });
$("style").onchange = async () => { if (last) { await showGallery(); await showSummary(); } };
init().catch(e => $("error").textContent = e.message);

// Drawing the region: pointer events (a mouse, a pen or a finger alike) on an SVG laid over the scan,
// in the scan's own pixels. Pressing inside the drawn region moves it; elsewhere starts a new one.
let drag = null;
const regionSvg = $("regionSvg");

function boxOf(points) {
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  return [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)];
}

function regionPoints() {
  if (region.kind !== "box") return region.points;
  const [x0, y0, x1, y1] = boxOf(region.points);
  return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
}

function toScan(e) {
  const r = regionSvg.getBoundingClientRect(), [rows, cols] = scanSize;
  return [Math.min(cols, Math.max(0, (e.clientX - r.left) / r.width * cols)),
          Math.min(rows, Math.max(0, (e.clientY - r.top) / r.height * rows))];
}

function drawRegion() {
  regionSvg.replaceChildren();
  $("regionTools").hidden = !scanSize;
  regionSvg.style.pointerEvents = scanSize ? "auto" : "none";  // drawing starts once the scan's size is known
  if (!scanSize) return;
  regionSvg.setAttribute("viewBox", `0 0 ${scanSize[1]} ${scanSize[0]}`);
  $("searchRegion").disabled = $("clearRegion").disabled = !region;
  if (!region) { $("regionNote").textContent = "No region drawn: searches read the whole slice."; return; }
  const poly = document.createElementNS("http://www.w3.org/2000/svg", "polygon");
  poly.setAttribute("points", regionPoints().map(p => p.join(",")).join(" "));
  regionSvg.appendChild(poly);
  const [x0, y0, x1, y1] = boxOf(region.points).map(Math.round);
  $("regionNote").textContent = region.kind === "box" ? `Rectangle ${x0},${y0} to ${x1},${y1} (scan pixels).`
    : `Free outline of ${region.points.length} points within ${x0},${y0} to ${x1},${y1} (scan pixels).`;
}

function clearRegion() { region = null; drag = null; drawRegion(); }

regionSvg.addEventListener("pointerdown", (e) => {
  if (!scanSize) return;
  e.preventDefault();
  try { regionSvg.setPointerCapture(e.pointerId); } catch (err) { /* a pointer the browser no longer tracks */ }
  const p = toScan(e);
  if (region) {
    const [x0, y0, x1, y1] = boxOf(region.points);
    if (p[0] >= x0 && p[0] <= x1 && p[1] >= y0 && p[1] <= y1) {
      drag = {move: true, from: p, points: region.points.map(q => q.slice())};
      return;
    }
  }
  drag = {move: false};
  region = {kind: $("regionKind").value, points: [p, p]};
  drawRegion();
});

regionSvg.addEventListener("pointermove", (e) => {
  if (!drag) return;
  const p = toScan(e);
  if (drag.move) {  // moved as a whole, never past the scan's edges
    const [x0, y0, x1, y1] = boxOf(drag.points), [rows, cols] = scanSize;
    const dx = Math.min(cols - x1, Math.max(-x0, p[0] - drag.from[0]));
    const dy = Math.min(rows - y1, Math.max(-y0, p[1] - drag.from[1]));
    region.points = drag.points.map(q => [q[0] + dx, q[1] + dy]);
  } else if (region.kind === "box") region.points[1] = p;
  else {
    const q = region.points[region.points.length - 1];
    if (Math.hypot(p[0] - q[0], p[1] - q[1]) >= 1) region.points.push(p);
  }
  drawRegion();
});

function endDrag() {
  if (!drag) return;
  drag = null;
  const [x0, y0, x1, y1] = boxOf(region.points);
  if (x1 - x0 < 2 || y1 - y0 < 2 || (region.kind === "outline" && region.points.length < 3)) region = null;  // a click, not a region
  drawRegion();
}
regionSvg.addEventListener("pointerup", endDrag);
regionSvg.addEventListener("pointercancel", endDrag);

// The region as the API takes it: a rectangle as "x0,y0,x1,y1"; a free outline as a binary PNG
// mask of the scan's size (the polygon filled, its anti-aliased edge thresholded).
async function regionForm() {
  if (region.kind === "box") {
    const [x0, y0, x1, y1] = boxOf(region.points);
    return [["region", [[Math.floor(x0), Math.floor(y0), Math.ceil(x1), Math.ceil(y1)].join(",")]]];
  }
  const [rows, cols] = scanSize, canvas = document.createElement("canvas");
  canvas.width = cols; canvas.height = rows;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, cols, rows);
  ctx.fillStyle = "#fff"; ctx.beginPath();
  region.points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
  ctx.closePath(); ctx.fill();
  const img = ctx.getImageData(0, 0, cols, rows);
  for (let i = 0; i < img.data.length; i += 4) {
    const v = img.data[i] >= 128 ? 255 : 0;
    img.data[i] = img.data[i + 1] = img.data[i + 2] = v; img.data[i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  const blob = await new Promise(ok => canvas.toBlob(ok, "image/png"));
  return [["region_mask", [blob, "region.png"]]];
}

$("searchRegion").onclick = () => runQuery(true);
$("clearRegion").onclick = clearRegion;
