// cai review page: plain JS over the job API. The key stays in sessionStorage (this tab only)
// and goes out as `Authorization: Bearer KEY`. Model text is always inserted as text, never as HTML.
"use strict";

const KEY = "cai.apiKey";
const PAGE = 10;
// cursor: the current row (keys.js); sample: the sample query shown instead of pages, or null
const state = { job: null, offset: 0, principles: {}, timer: null, recordsSeen: -1, cursor: 0, sample: null,
                busy: false };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const fmt = (x, d = 3) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(d));
const pct = (x) => (x === null || x === undefined ? "n/a" : `${(100 * x).toFixed(1)}%`);
function say(text, bad = false) { const s = $("status-line"); s.textContent = text; s.style.color = bad ? "#c0362c" : ""; }

async function api(path, opts = {}) {
  const key = sessionStorage.getItem(KEY);
  if (!key) throw new Error("enter an API key first");
  const init = { method: opts.method || "GET", headers: { Authorization: `Bearer ${key}` } };
  if (opts.body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(opts.body); }
  const res = await fetch(path, init);
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail; } catch (e) { /* not JSON */ }
    if (res.status === 401) $("key-state").textContent = "key rejected";
    throw new Error(`${res.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return opts.raw ? res : res.json();
}

// ------------------------------------------------------------------ jobs list

async function loadJobs() {
  let data;
  try { data = await api("/v1/jobs"); } catch (e) { say(e.message, true); return; }
  $("key-state").textContent = "key accepted";
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren();
  $("jobs-empty").hidden = data.jobs.length > 0;
  for (const job of data.jobs) {
    const p = job.progress;
    const bar = p.total ? el("progress", { max: p.total, value: p.done }) : null;
    const errors = Object.entries(job.errors).map(([k, v]) => `${k}: ${v}`).join(", ") || "0";
    const row = el("tr", { "data-job-id": job.id, class: state.job && state.job.id === job.id ? "selected" : null,
                           onclick: () => openJob(job.id) },
      el("td", {}, el("code", { text: job.id })), el("td", { text: job.kind }),
      el("td", { class: `state-${job.state}`, text: job.state + (job.cancel_requested ? " (cancelling)" : "") }),
      el("td", {}, bar, ` ${p.done}/${p.total ?? "?"}` + (p.resumed ? ` (+${p.resumed} resumed)` : "")),
      el("td", { text: job.records }), el("td", { text: errors }),
      el("td", { text: job.tokens_per_second ? job.tokens_per_second.toFixed(1) : "" }),
      el("td", { class: "muted", text: job.created_at.replace("T", " ").replace("+00:00", "Z") }));
    body.append(row);
  }
  const active = data.jobs.some((j) => j.state === "queued" || j.state === "running");
  clearTimeout(state.timer);
  if (active) state.timer = setTimeout(refresh, 2000);
}

async function refresh() {
  await loadJobs();
  if (state.job) await loadJob(false);
}

// ------------------------------------------------------------------ one job

async function openJob(id) {
  state.job = { id }; state.offset = 0; state.principles = {}; state.recordsSeen = -1;
  state.cursor = 0; state.sample = null;
  location.hash = `job=${id}`;
  $("job-pane").hidden = false;
  $("export-preview").hidden = true; $("export-link").hidden = true;
  await loadJob(true);
  for (const tr of $("jobs").querySelectorAll("tbody tr")) tr.classList.toggle("selected", tr.dataset.jobId === id);
}

async function loadJob(first) {
  let job;
  try { job = await api(`/v1/jobs/${state.job.id}`); } catch (e) { say(e.message, true); return; }
  state.job = job;
  renderSummary(job);
  $("sample-controls").hidden = job.kind === "judge-eval";
  if (job.kind === "prefs") await loadAgreement();
  else $("agreement-box").hidden = true;
  if (first && job.kind !== "judge-eval") {
    try {
      const c = await api(`/v1/jobs/${job.id}/constitution`);
      state.principles = Object.fromEntries(c.principles.map((p) => [p.id, p]));
      const sel = $("filter-principle");
      sel.replaceChildren(el("option", { value: "", text: "any" }),
        ...c.principles.map((p) => el("option", { value: p.id, text: p.id })));
    } catch (e) { say(e.message, true); }
  }
  if (first || job.records !== state.recordsSeen) await loadRecords();
}

function renderSummary(job) {
  $("job-title").textContent = `${job.kind} job ${job.id}`;
  const r = job.reviews, p = job.progress;
  const items = [
    ["state", job.state + (job.message ? ` — ${job.message}` : "")],
    ["progress", `${p.done}/${p.total ?? "?"} inputs this run` + (p.resumed ? `, ${p.resumed} records resumed` : "") + (p.step ? ` · ${p.step}` : "")],
    ["records", `${job.records} (${Object.entries(job.errors).map(([k, v]) => `${k}: ${v}`).join(", ") || "no errors"})`],
    ["tokens", `${job.tokens}` + (job.tokens_per_second ? ` · ${job.tokens_per_second.toFixed(1)} tok/s` : "")],
  ];
  if (job.kind !== "judge-eval") {
    items.push(["reviews", `${r.records_reviewed} records reviewed: ${r.agree} agree, ${r.flip} flip, ${r.discard} discard`]);
  }
  if (job.kind === "prefs") items.push(["reviewer–judge agreement", `${pct(r.agreement_rate)} (agree / (agree + flip))`]);
  if (job.kind === "judge-eval" && job.summary) {
    items.push(["judge accuracy", `${fmt(job.summary.cai.accuracy)} (consistency ${fmt(job.summary.cai.consistency)})`]);
  }
  $("job-summary").replaceChildren(...items.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { id: `summary-${k.split(/\W/)[0]}`, text: v })]));
  const sel = $("export-file"), chosen = sel.value;
  sel.replaceChildren(...job.files.map((f) => el("option", { value: f, text: f })));
  if (job.files.includes(chosen)) sel.value = chosen;
  $("export-btn").disabled = job.files.length === 0;
  $("cancel-btn").hidden = !(job.state === "queued" || job.state === "running");
  $("resume-btn").hidden = !(job.state === "cancelled" || job.state === "failed");
}

async function loadRecords() {
  const job = state.job;
  const q = new URLSearchParams(state.sample ? state.sample : { offset: state.offset, limit: PAGE });
  if ($("filter-status").value && !state.sample) q.set("status", $("filter-status").value);
  if ($("filter-principle").value) q.set("principle", $("filter-principle").value);
  let data;
  try { data = await api(`/v1/jobs/${job.id}/records?${q}`); } catch (e) { say(e.message, true); return false; }
  state.recordsSeen = job.records;
  if (data.sample) $("page-info").textContent = sampleText(data.sample);
  else {
    $("page-info").textContent = data.total
      ? `${state.offset + 1}–${state.offset + data.items.length} of ${data.total}` : "no records";
  }
  $("prev-page").disabled = state.offset === 0 || !!data.sample;
  $("next-page").disabled = state.offset + data.items.length >= data.total || !!data.sample;
  $("sample-clear").hidden = !data.sample;
  $("sample-strata").hidden = !data.sample;
  if (data.sample) renderStrata(data.sample);
  const render = { sft: sftRecord, prefs: prefsRecord, "judge-eval": evalRecord }[job.kind];
  $("records").replaceChildren(...data.items.map(render));
  markCursor(false);
  return true;
}

// ------------------------------------------------------------------ sample for review, agreement

function sampleText(s) {
  return `sample: ${s.drawn} of ${s.population} rows (${s.strategy}, seed ${s.seed})`;
}

function renderStrata(s) {
  const cuts = s.confidence_cuts.length
    ? ` · confidence tertiles at ${s.confidence_cuts.map((c) => fmt(c, 2)).join(" / ")}` : "";
  $("sample-strata").replaceChildren(
    el("summary", { text: `${s.strata.length} strata (principle × judge confidence)${cuts}` }),
    el("table", { class: "judge-table" },
      el("thead", {}, el("tr", {}, ...["principle", "confidence", "rows", "drawn"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...s.strata.map((t) => el("tr", {}, el("td", { text: t.principle || "(none)" }),
        el("td", { text: t.confidence }), el("td", { text: t.population }), el("td", { text: t.drawn }))))));
}

async function loadSample() {
  const n = Number($("sample-n").value), seed = Number($("sample-seed").value);
  if (!Number.isInteger(n) || n < 1) {
    say("sample size: a whole number, 1 or more (the server caps it)", true); return;
  }
  if (!Number.isInteger(seed) || seed < 0) { say("seed: a whole number, 0 or more", true); return; }
  const previous = state.sample;
  state.sample = { sample: n, strategy: $("sample-strategy").value, seed };
  state.cursor = 0;
  if (!(await loadRecords())) state.sample = previous; // refused (e.g. over the cap): keep what was shown
}

async function loadAgreement() {
  let data;
  try { data = await api(`/v1/jobs/${state.job.id}/agreement`); } catch (e) { say(e.message, true); return; }
  const ci = (a) => (a.ci ? `${pct(a.ci.low)} – ${pct(a.ci.high)}` : "n/a");
  const row = (a, cls) => el("tr", { class: cls, "data-principle": a.principle ?? "" },
    el("td", { text: a.principle === null ? "all principles" : a.principle || "(none)" }),
    el("td", { text: a.agree }), el("td", { text: a.flip }), el("td", { class: "n", text: a.n }),
    el("td", { class: "rate", text: pct(a.rate) }), el("td", { class: "ci", text: ci(a) }));
  $("agreement").querySelector("tbody").replaceChildren(...data.principles.map((a) => row(a, null)),
    row(data.overall, "total"));
  $("agreement-note").textContent = `${data.discarded} discarded rows not counted; n = agree + flip.`;
  $("agreement-box").hidden = false;
}

// ------------------------------------------------------------------ records

function messages(msgs) {
  return msgs.map((m) => el("div", { class: "step prompt" },
    el("div", { class: "step-label", text: m.role }), el("div", { class: "text", text: m.content })));
}

function principleLabel(pid) { return pid ? el("span", { class: "principle", text: ` · ${pid}` }) : null; }

function head(rec, extra = []) {
  return el("div", { class: "record-head" }, el("code", { text: rec.id }), ...extra,
    rec.review ? el("span", { class: "badge warn", text: `reviewed: ${rec.review}` }) : null,
    rec.error ? el("span", { class: "badge bad", text: `error: ${rec.error.code}` }) : null);
}

function errorBox(err) {
  if (!err) return null;
  return el("div", { class: "error-box" }, `${err.code}: ${err.message}`,
    err.raw ? el("details", {}, el("summary", { text: "raw text" }), el("pre", { text: err.raw })) : null);
}

function reviewBar(rec, labels) {
  if (rec.error) return el("div", { class: "review muted", text: "error rows are not exported and not reviewed" });
  const who = (rec.reviews || []).map((r) => `${r.reviewer}: ${r.label}`).join(", ");
  return el("div", { class: "review" }, el("span", { class: "muted", text: "review:" }),
    ...labels.map((label) => el("button", { type: "button", class: `review-btn${rec.review === label ? " active" : ""}`,
      "data-label": label, "data-record-id": rec.id, onclick: () => review(rec.id, label) }, label)),
    who ? el("span", { class: "muted", text: who }) : null);
}

function revisionDiff(initial, text) {
  const { node, added, removed } = diffView(initial, text);
  return el("details", { class: "diff-box", open: true },
    el("summary", { text: `changes from the initial answer: +${added} / −${removed} words` }), node);
}

function sftRecord(rec) {
  const initial = (rec.trajectory.find((s) => s.kind === "answer") || {}).text;
  const steps = rec.trajectory.map((s) => {
    const p = state.principles[s.principle_id];
    const request = p && s.kind !== "answer" ? (s.kind === "critique" ? p.critique_request : p.revision_request) : null;
    return el("div", { class: `step ${s.kind}` },
      el("div", { class: "step-label" }, s.kind, principleLabel(s.principle_id),
        s.finish_reason !== "stop" ? el("span", { class: "badge bad", text: s.finish_reason }) : null),
      request ? el("details", {}, el("summary", { text: `${s.kind} request` }), el("div", { class: "text muted", text: request })) : null,
      s.kind === "revision" && initial !== undefined ? revisionDiff(initial, s.text)
        : el("div", { class: "text", text: s.text }));
  });
  const c = rec.lineage.constitution;
  return el("div", { class: `record${rec.error ? " has-error" : ""}`, "data-record-id": rec.id },
    head(rec, [el("span", { class: "badge", text: `${c.name} v${c.version}` })]),
    ...messages(rec.prompt), ...steps,
    rec.final ? el("div", { class: "step revision" }, el("div", { class: "step-label", text: "final (SFT target)" }),
      el("div", { class: "text", text: rec.final })) : null,
    errorBox(rec.error), reviewBar(rec, ["agree", "discard"]));
}

function prefsRecord(rec) {
  const j = rec.judgement || {};
  const [a, b] = rec.pair || [null, null];
  const box = (label, idx) => idx === null ? null : el("div", { class: `answer-box${rec.chosen_index === idx ? " chosen" : ""}`,
      "data-answer": label },
    el("div", { class: "step-label" }, `answer ${label}`, el("span", { class: "principle", text: ` · sample #${idx}` }),
      rec.chosen_index === idx ? el("span", { class: "badge good", text: "judge's choice" }) : null,
      rec.review === "flip" && rec.rejected_index === idx ? el("span", { class: "badge warn", text: "reviewer's choice" }) : null),
    el("div", { class: "text", text: rec.answers[idx].text }));
  const p = state.principles[j.principle_id];
  const orders = (j.orders || []).map((o, n) => el("tr", {},
    el("td", { text: `order ${n + 1}` }), el("td", { text: `${o.first === "A" ? "A" : "B"} shown first` }),
    el("td", { text: `P(A) = ${fmt(o.p_a)}` }), el("td", { class: "error-box", text: o.error ? o.error.code : "" })));
  const table = el("table", { class: "judge-table" }, el("tbody", {}, ...orders,
    el("tr", {}, el("th", { text: "P(A), both orders" }), el("td", { "data-field": "p_a", text: fmt(j.p_a) }),
      el("th", { text: "consistent" }), el("td", { text: j.consistent === null || j.consistent === undefined ? "n/a" : j.consistent ? "yes" : "no" })),
    el("tr", {}, el("th", { text: "confidence" }), el("td", { text: fmt(j.confidence) }),
      el("th", { text: "score (P chosen)" }), el("td", { text: fmt(rec.score) }))));
  const others = rec.answers.map((s, i) => el("div", { class: "step answer" },
    el("div", { class: "step-label" }, `sample #${i}`, s.excluded ? el("span", { class: "badge bad", text: `excluded: ${s.excluded}` }) : null),
    el("div", { class: "text", text: s.text })));
  const exported = rec.exported === undefined ? null
    : el("span", { class: `badge ${rec.exported ? "good" : "warn"}`, text: rec.exported ? "exported" : "not exported" });
  return el("div", { class: `record${rec.error ? " has-error" : ""}`, "data-record-id": rec.id },
    head(rec, [j.principle_id ? el("span", { class: "badge", text: j.principle_id }) : null, exported]),
    ...messages(rec.prompt),
    p ? el("div", { class: "muted", text: `question: ${p.comparison_question}` }) : null,
    el("div", { class: "pair" }, box("A", a), box("B", b)), j.mode ? table : null,
    el("details", {}, el("summary", { text: `all ${rec.answers.length} samples` }), ...others),
    errorBox(rec.error), reviewBar(rec, ["agree", "flip", "discard"]));
}

function evalRecord(rec) {
  const row = (name, r) => r && el("tr", {}, el("td", { text: name }), el("td", { text: `P(A) = ${fmt(r.p_a)}` }),
    el("td", { text: `orders: ${(r.p_a_orders || []).map((x) => fmt(x)).join(" / ")}` }),
    el("td", { text: `consistent: ${r.consistent ?? "n/a"}` }), el("td", { class: "error-box", text: r.error || "" }));
  return el("div", { class: "record", "data-record-id": rec.id },
    el("div", { class: "record-head" }, el("code", { text: rec.cai.source }), el("span", { class: "badge", text: `human: ${rec.cai.human}` })),
    el("table", { class: "judge-table" }, el("tbody", {}, row("cai judge", rec.cai), row("baseline", rec.baseline))));
}

// ------------------------------------------------------------------ actions

// Label a record (buttons and keys.js); true once stored and the page re-rendered.
async function review(recordId, label) {
  try {
    await api(`/v1/jobs/${state.job.id}/reviews`, { method: "POST", body: { record_id: recordId, label } });
    say(`${label}: ${recordId}`);
    await loadJob(false); await loadRecords();
    return true;
  } catch (e) { say(e.message, true); return false; }
}

async function doExport() {
  const name = $("export-file").value;
  try {
    const res = await api(`/v1/jobs/${state.job.id}/export?file=${encodeURIComponent(name)}`, { raw: true });
    const blob = await res.blob();
    const link = $("export-link");
    if (link.href) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(blob); link.download = `${state.job.id}-${name}`; link.hidden = false;
    link.textContent = `download ${name} (${blob.size} bytes)`;
    const pre = $("export-preview");
    if (/\.(jsonl|json|md)$/.test(name)) {
      const text = await blob.text();
      const lines = name.endsWith(".jsonl") ? text.split("\n").filter(Boolean) : [text];
      pre.dataset.rows = name.endsWith(".jsonl") ? String(lines.length) : "";
      pre.textContent = name.endsWith(".jsonl")
        ? `${lines.length} rows; first ${Math.min(3, lines.length)}:\n` + lines.slice(0, 3).map((l) => JSON.stringify(JSON.parse(l), null, 1)).join("\n\n")
        : text;
      pre.hidden = false;
    } else pre.hidden = true;
    say(`exported ${name}`);
  } catch (e) { say(e.message, true); }
}

async function jobAction(action) {
  try { await api(`/v1/jobs/${state.job.id}/${action}`, { method: "POST" }); await refresh(); }
  catch (e) { say(e.message, true); }
}

function init() {
  const saved = sessionStorage.getItem(KEY);
  if (saved) $("key-state").textContent = "key set";
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key); $("key-input").value = "";
    $("key-state").textContent = "key set"; loadJobs();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY); $("key-state").textContent = "no key";
    $("jobs").querySelector("tbody").replaceChildren(); $("job-pane").hidden = true; state.job = null;
  });
  $("jobs-refresh").addEventListener("click", refresh);
  $("job-close").addEventListener("click", () => { $("job-pane").hidden = true; state.job = null; location.hash = ""; });
  $("export-btn").addEventListener("click", doExport);
  $("cancel-btn").addEventListener("click", () => jobAction("cancel"));
  $("resume-btn").addEventListener("click", () => jobAction("resume"));
  $("prev-page").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadRecords(); });
  $("next-page").addEventListener("click", () => { state.offset += PAGE; loadRecords(); });
  for (const id of ["filter-status", "filter-principle"]) {
    $(id).addEventListener("change", () => { state.offset = 0; state.cursor = 0; loadRecords(); });
  }
  $("sample-btn").addEventListener("click", loadSample);
  $("sample-clear").addEventListener("click", () => {
    state.sample = null; state.offset = 0; state.cursor = 0; loadRecords();
  });
  $("records").addEventListener("click", (ev) => {  // a clicked row becomes the current one
    const rec = ev.target.closest(".record");
    if (rec) { state.cursor = [...$("records").children].indexOf(rec); markCursor(false); }
  });
  if (saved) {
    loadJobs();
    const m = location.hash.match(/job=([0-9a-f]{16})/);
    if (m) openJob(m[1]);
  }
}

document.addEventListener("DOMContentLoaded", init);
