// The live explorer: asks the server (relative URLs, so the app can be mounted under a prefix)
// and builds every element from data with textContent. No text from the server is ever parsed
// as HTML (no innerHTML), so a corpus text holding <script> shows as text and runs nothing.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "background") node.style.background = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Python's format(x, ".Ng"), near enough for scores
function num(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "";
  return String(parseFloat(Number(value).toPrecision(digits || 3)));
}
const signed = (value, digits) => (value >= 0 ? "+" : "") + num(value, digits);

async function api(path, body) {
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = {error: `${response.status} ${response.statusText}`}; }
  if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
  return data;
}

// -- one hit, as the static explorer renders it (report/explorer.py _hit_html) -----------
function pieces(hit) {
  const out = [];
  for (const piece of hit.pieces) {
    if (piece.shade) {
      const inner = piece.shared ? el("span", {class: "sh", text: piece.text}) : piece.text;
      out.push(el("span", {class: "tk", background: piece.shade, title: signed(piece.value, 4)}, inner));
    } else if (piece.mark) {
      out.push(el("mark", {text: piece.text}));
    } else {
      out.push(piece.text);
    }
  }
  return out;
}

function hitItem(hit) {
  const item = el("li", {value: hit.rank}, ...pieces(hit));
  if (hit.token_total !== null && hit.token_total !== undefined) {
    const special = hit.token_special ? ` (special tokens ${signed(hit.token_special, 3)})` : "";
    item.append(el("div", {class: "meta", text: `token parts sum to ${num(hit.token_total, 4)}${special}`}));
  }
  const meta = el("div", {class: "meta"}, `score ${num(hit.score, 4)}`);
  if (hit.correct) meta.append(" · ", el("span", {class: "ok", title: "annotated with the query's fact", text: "✓ fact"}));
  if (hit.delta_p !== null && hit.delta_p !== undefined) {
    meta.append(` · tail-patch ${signed(100 * hit.delta_p, 3)} pp`);
  }
  if (hit.label) {
    meta.append(" · ", el("span", {class: `lab ${hit.label_class || ""}`, text: hit.label,
                                   title: `shares ${hit.shared_span} words verbatim with prompt + target`}));
  }
  meta.append(" · ", el("a", {href: "#example=" + encodeURIComponent(hit.example_id), text: hit.example_id,
                              class: "example-link"}));
  item.append(meta);
  return item;
}

function runColumn(result) {
  const section = el("section", {class: "run", "data-method": result.method},
    el("h2", {}, result.method, " ", el("span", {class: "meta", text: `${num(result.seconds, 2)} s`})));
  const list = el("ol", {class: "proponents"}, ...result.proponents.map(hitItem));
  section.append(result.proponents.length ? list : el("p", {class: "meta", text: "no proponents"}));
  if (result.opponents.length) {
    section.append(el("details", {},
      el("summary", {text: `opponents (${result.opponents.length})`}),
      el("ol", {class: "opponents"}, ...result.opponents.map(hitItem))));
  }
  return section;
}

function showAnswer(data) {
  $("heading").replaceChildren(data.prompt, " ", el("span", {class: "target", text: data.target}));
  const facts = $("facts");
  const stored = data.stored_query;
  facts.replaceChildren(`database version ${data.version}`);
  if (stored) {
    facts.append(` · stored query ${stored.query_id}`);
    if (stored.relation) facts.append(` · relation ${stored.relation}`);
    if (stored.bucket !== null) facts.append(` · frequency bucket ${stored.bucket}`);
    if (stored.correct === null) facts.append(" · model answer: not measured");
    else facts.append(" · model: ", el("span", {class: stored.correct ? "ok" : "bad",
      text: stored.correct ? "✓ answers correctly" : "✗ answers wrongly"}), ` (P(target) = ${num(stored.p_target)})`);
  }
  $("results").replaceChildren(...data.results.map(runColumn));
}

async function ask(event) {
  event.preventDefault();
  const methods = [...document.querySelectorAll("#methods input:checked")].map((box) => box.value);
  $("query-error").textContent = "";
  $("run").disabled = true;
  $("results").setAttribute("aria-busy", "true");
  try {
    showAnswer(await api("api/query", {prompt: $("prompt").value, target: $("target").value, methods,
                                        k: Number($("k").value) || 5, tokens: 3,
                                        ann: $("ann").checked, verify: $("verify").checked}));
  } catch (error) {
    $("query-error").textContent = error.message;
  } finally {
    $("run").disabled = false;
    $("results").removeAttribute("aria-busy");
  }
}

// -- tables (evaluation, SQL, example metadata) ----------------------------------------------
// a float column's values all to the column's places, as every table prints them (numbers.py)
function cell(value, places) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number" && places !== undefined) return value.toFixed(places);
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : num(value, 4);  // one value, no column
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function dataTable(data) {
  if (!data.columns.length) return el("p", {class: "meta", text: "(nothing stored yet)"});
  const head = el("tr", {}, ...data.columns.map((c) => el("th", {text: c.name, title: c.type})));
  const rows = data.rows.map((row) => el("tr", {}, ...row.map((value, i) => el("td", {text: cell(value, data.columns[i].places)}))));
  const note = `${data.num_rows} row${data.num_rows === 1 ? "" : "s"}${data.truncated ? " (cut)" : ""}`;
  return el("div", {}, el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)),
            el("p", {class: "meta", text: note}));
}

async function evaluation() {
  try {
    $("evaluation").replaceChildren(dataTable(await api("api/evaluation?by=" + encodeURIComponent($("by").value))));
  } catch (error) {
    $("evaluation").replaceChildren(el("p", {class: "bad", text: error.message}));
  }
}

async function runSQL(event) {
  event.preventDefault();
  $("sql-error").textContent = "";
  try {
    $("sql-result").replaceChildren(dataTable(await api("api/sql", {sql: $("sql").value})));
  } catch (error) {
    $("sql-result").replaceChildren();
    $("sql-error").textContent = error.message;
  }
}

// -- an example's text and metadata (#example=ID) ---------------------------------------------
async function showExample() {
  const match = location.hash.match(/^#example=(.+)$/);
  if (!match) { $("example").hidden = true; return; }
  const id = decodeURIComponent(match[1]);
  $("example-id").textContent = id;
  try {
    const row = await api("api/examples/" + encodeURIComponent(id));
    $("example-text").textContent = row.text;
    const rows = Object.entries(row).filter(([key]) => key !== "text")
      .map(([key, value]) => el("tr", {}, el("th", {text: key}), el("td", {text: cell(value)})));
    $("example-meta").replaceChildren(el("tbody", {}, ...rows));
  } catch (error) {
    $("example-text").textContent = error.message;
    $("example-meta").replaceChildren();
  }
  $("example").hidden = false;
  $("example").scrollIntoView({block: "nearest"});
}

// -- start: status, methods, stored queries, evaluation ---------------------------------------
async function start() {
  $("ask").addEventListener("submit", ask);
  $("sql-form").addEventListener("submit", runSQL);
  $("by").addEventListener("change", evaluation);
  $("example-close").addEventListener("click", (event) => { event.preventDefault(); history.replaceState(null, "", location.pathname + location.search); showExample(); });
  window.addEventListener("hashchange", showExample);
  try {
    const [version, health, methods] = await Promise.all([api("api/version"), api("api/health"), api("api/methods")]);
    $("status").textContent = ` · trackstar-db ${version.trackstar_db} · ${version.database} · version ${version.version}` +
      ` · ${health.examples} examples · ${health.device}` + (version.follow ? "" : " · fixed version");
    $("ann-label").hidden = !methods.methods.some((m) => m.ann);
    let checked = 0;
    $("methods").replaceChildren(...methods.methods.map((m) => {
      const box = el("input", {type: "checkbox", value: m.name, disabled: !m.available});
      if (m.available && checked < 2 && ["trackstar", "bm25", "grad-cos", "r-train", "opt-cos"].includes(m.name)) {
        box.checked = true; checked += 1;
      }
      return el("label", {class: m.available ? "" : "off", title: m.reason || m.kind}, box, m.name);
    }));
  } catch (error) {
    $("status").textContent = " · " + error.message;
  }
  try {
    const stored = await api("api/queries?limit=200");
    const picker = $("stored");
    for (const row of stored.rows) {
      const [, prompt, target] = row;
      picker.append(el("option", {value: JSON.stringify([prompt, target]), text: `${prompt} → ${target}`}));
    }
    picker.addEventListener("change", () => {
      if (!picker.value) return;
      const [prompt, target] = JSON.parse(picker.value);
      $("prompt").value = prompt; $("target").value = target;
    });
  } catch (error) { /* a database without queries: the picker stays empty */ }
  evaluation();
  showExample();
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
