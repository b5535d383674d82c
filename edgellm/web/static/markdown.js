// A small Markdown renderer for model answers. Safety comes from its order: the whole text is
// HTML-escaped first, then a few patterns (fenced code, inline code, bold, italics, headings,
// lists, paragraphs) are turned into tags this file writes itself. No tag or attribute ever comes
// from the text, and there are no links or images, so an answer containing <script> or
// <img onerror=...> shows as those characters.
"use strict";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Inline spans of escaped text: `code` first (nothing inside it is formatted), then **bold** and
// *italic* / _italic_ in the rest (underscores only at word boundaries: snake_case stays).
function inline(escaped) {
  return escaped
    .split(/(`[^`\n]+`)/)
    .map((part, i) => {
      if (i % 2 === 1) return "<code>" + part.slice(1, -1) + "</code>";
      return part
        .replace(/\*\*(?=\S)([^*]*?\S)\*\*/g, "<strong>$1</strong>")
        .replace(/(^|[^_\w])__(?=\S)([^_]*?\S)__(?![_\w])/g, "$1<strong>$2</strong>")
        .replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?!\w)/g, "$1<em>$2</em>")
        .replace(/(^|[^_\w])_(?=\S)([^_]*?\S)_(?!\w)/g, "$1<em>$2</em>");
    })
    .join("");
}

const FENCE = /^\s*```/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;
const HEADING = /^\s*(#{1,6})\s+(.*)$/;

// Markdown text -> an HTML string made of escaped text and the tags above. An unclosed fence
// (an answer still streaming) is a code block up to the end.
function renderMarkdown(text) {
  const lines = escapeHtml(String(text)).split("\n");
  const out = [];
  let para = [];
  let list = null; // "ul" or "ol" while inside a list

  function flushPara() {
    if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
    para = [];
  }
  function closeList() {
    if (list) out.push("</" + list + ">");
    list = null;
  }

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (FENCE.test(line)) {
      flushPara();
      closeList();
      const code = [];
      for (i++; i < lines.length && !FENCE.test(lines[i]); i++) code.push(lines[i]);
      out.push("<pre><code>" + code.join("\n") + "</code></pre>");
      continue;
    }
    const bullet = BULLET.exec(line);
    const numbered = bullet ? null : NUMBERED.exec(line);
    if (bullet || numbered) {
      flushPara();
      const kind = bullet ? "ul" : "ol";
      if (list !== kind) {
        closeList();
        out.push("<" + kind + ">");
        list = kind;
      }
      out.push("<li>" + inline((bullet || numbered)[1]) + "</li>");
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      flushPara();
      closeList();
      out.push('<p class="heading"><strong>' + inline(heading[2]) + "</strong></p>");
      continue;
    }
    if (!line.trim()) {
      flushPara();
      closeList();
      continue;
    }
    closeList();
    para.push(line);
  }
  flushPara();
  closeList();
  return out.join("");
}
