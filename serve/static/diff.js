// Word-level diff for the review page (phase-1 trajectories: the initial answer against each revision).
// Computed here, in the browser: the records already carry both texts, so the API stays as it is.
// Tokens are words with the whitespace after them, compared by the word; a longest common subsequence
// over the words (after the common start and end are set aside) gives the kept words, the rest is
// deleted from the old text or inserted from the new one. Text goes in as text nodes, never as HTML.
"use strict";

const DIFF_CELLS = 4_000_000; // LCS table size (words x words) above which the middle is one replacement

function diffTokens(text) {
  return text.match(/^\s+|\S+\s*/g) || [];
}

// [[op, text], ...] with op "=" (kept), "-" (deleted from a), "+" (inserted from b); runs merged.
function wordDiff(a, b) {
  const x = diffTokens(a), y = diffTokens(b);
  const same = (i, j) => x[i].trim() === y[j].trim();
  let start = 0;
  while (start < x.length && start < y.length && same(start, start)) start++;
  let endX = x.length, endY = y.length;
  while (endX > start && endY > start && same(endX - 1, endY - 1)) { endX--; endY--; }
  const ops = x.slice(0, start).map((t, i) => ["=", y[i]]);
  const n = endX - start, m = endY - start;
  if (n * m > DIFF_CELLS) {
    ops.push(...x.slice(start, endX).map((t) => ["-", t]), ...y.slice(start, endY).map((t) => ["+", t]));
  } else {
    // table[i][j]: LCS length of x[start+i:endX] and y[start+j:endY]
    const w = m + 1, table = new Uint32Array((n + 1) * w);
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) {
        table[i * w + j] = same(start + i, start + j) ? table[(i + 1) * w + j + 1] + 1
          : Math.max(table[(i + 1) * w + j], table[i * w + j + 1]);
      }
    }
    let i = 0, j = 0;
    while (i < n || j < m) {
      if (i < n && j < m && same(start + i, start + j)) { ops.push(["=", y[start + j]]); i++; j++; }
      else if (j >= m || (i < n && table[(i + 1) * w + j] >= table[i * w + j + 1])) {
        ops.push(["-", x[start + i]]); i++;
      }
      else { ops.push(["+", y[start + j]]); j++; }
    }
  }
  ops.push(...y.slice(endY).map((t) => ["=", t]));
  const merged = [];
  for (const [op, text] of ops) {
    const last = merged[merged.length - 1];
    if (last && last[0] === op) last[1] += text; else merged.push([op, text]);
  }
  return merged;
}

// {node, added, removed}: the diff as a .diff block with <ins> / <del>, and the words inserted / deleted.
function diffView(oldText, newText) {
  const node = document.createElement("div");
  node.className = "text diff";
  let added = 0, removed = 0;
  for (const [op, text] of wordDiff(oldText, newText)) {
    const count = (text.match(/\S+/g) || []).length;
    if (op === "=") { node.append(document.createTextNode(text)); continue; }
    const mark = document.createElement(op === "+" ? "ins" : "del");
    const trailing = text.match(/\s*$/)[0]; // marked words only, the space after them left plain
    mark.textContent = text.slice(0, text.length - trailing.length);
    node.append(...(mark.textContent ? [mark] : []), trailing);
    if (op === "+") added += count; else removed += count;
  }
  return { node, added, removed };
}
