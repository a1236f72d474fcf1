// Keyboard shortcuts of the review page: a current row (j / k or the arrows), labelled with a / f / d
// through the same review API as the buttons, after which the next row becomes current. Keys do nothing
// while typing in a field or with Ctrl / Alt / Meta held (the browser's own shortcuts keep working).
"use strict";

const SHORTCUTS = [
  ["j  or  ↓", "next row (at the end of a page: the next page)"],
  ["k  or  ↑", "previous row"],
  ["a", "agree with the judge (prefs) / keep the row (sft), then next row"],
  ["f", "flip the pair: the other answer is better (prefs), then next row"],
  ["d", "discard the row from the export, then next row"],
  ["?", "show or hide this list"],
  ["Esc", "hide this list"],
];
const LABEL_KEYS = { a: "agree", f: "flip", d: "discard" };

function rows() { return [...document.querySelectorAll("#records .record")]; }

// Highlight the current row (state.cursor, kept within the page) and bring it into view.
function markCursor(scroll = true) {
  const all = rows();
  state.cursor = Math.max(0, Math.min(state.cursor, all.length - 1));
  all.forEach((r, n) => r.classList.toggle("current", n === state.cursor));
  const current = all[state.cursor];
  if (current && scroll) current.scrollIntoView({ block: "nearest" });
  return current;
}

async function moveCursor(delta) {
  const count = rows().length;
  const next = state.cursor + delta;
  if (next >= count && !state.sample && !$("next-page").disabled) {
    state.offset += PAGE; state.cursor = 0; await loadRecords();
  } else if (next < 0 && !state.sample && state.offset > 0) {
    state.offset = Math.max(0, state.offset - PAGE); state.cursor = PAGE - 1; await loadRecords();
  } else {
    state.cursor = next;
  }
  markCursor();
}

async function labelCurrent(label) {
  const current = markCursor(false);
  if (!current) return;
  const button = current.querySelector(`button.review-btn[data-label="${label}"]`);
  if (!button) { say(`${label} does not apply to this row`, true); return; }
  state.busy = true;
  try {
    if (await review(current.dataset.recordId, label)) await moveCursor(1);
  } finally { state.busy = false; }
}

function toggleHelp(show) {
  const help = $("keys-help");
  help.hidden = show === undefined ? !help.hidden : !show;
}

function typing(target) {
  return target instanceof HTMLElement
    && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

function onKey(ev) {
  if (ev.ctrlKey || ev.altKey || ev.metaKey || typing(ev.target)) return;
  if (ev.key === "?") { toggleHelp(); ev.preventDefault(); return; }
  if (ev.key === "Escape") { toggleHelp(false); return; }
  if (!state.job || $("job-pane").hidden || state.busy) return;
  const key = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
  if (key === "j" || key === "ArrowDown") moveCursor(1);
  else if (key === "k" || key === "ArrowUp") moveCursor(-1);
  else if (LABEL_KEYS[key]) labelCurrent(LABEL_KEYS[key]);
  else return;
  ev.preventDefault();
}

function initKeys() {
  $("keys-help").querySelector("tbody").replaceChildren(...SHORTCUTS.map(([k, what]) =>
    el("tr", {}, el("td", {}, el("kbd", { text: k })), el("td", { text: what }))));
  $("keys-help-btn").addEventListener("click", () => toggleHelp());
  $("keys-help-close").addEventListener("click", () => toggleHelp(false));
  document.addEventListener("keydown", onKey);
}

document.addEventListener("DOMContentLoaded", initKeys);
