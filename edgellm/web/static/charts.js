// Small line charts drawn as inline SVG (no library): each series is a polyline scaled into the
// chart's viewBox, with an optional dashed reference line (the DRAM budget).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

// svg: the <svg> element (viewBox 0 0 W H). series: [{values: [number|null], cls}], nulls are
// gaps. opts: {min, max, ref (value of a dashed line)}.
function drawChart(svg, series, opts = {}) {
  const [, , W, H] = svg.getAttribute("viewBox").split(/\s+/).map(Number);
  const pad = 2;
  const all = series.flatMap((s) => s.values).filter((v) => v !== null && isFinite(v));
  let min = opts.min !== undefined ? opts.min : Math.min(0, ...all);
  let max = opts.max !== undefined ? opts.max : Math.max(...all, opts.ref || 0);
  if (!isFinite(max) || max <= min) max = min + 1;
  const n = Math.max(2, ...series.map((s) => s.values.length));
  const x = (i) => pad + (i * (W - 2 * pad)) / (n - 1);
  const y = (v) => H - pad - ((v - min) * (H - 2 * pad)) / (max - min);

  svg.replaceChildren();
  if (opts.ref !== undefined && opts.ref !== null) {
    svg.appendChild(svgEl("line", { x1: 0, x2: W, y1: y(opts.ref), y2: y(opts.ref), class: "ref" }));
  }
  for (const s of series) {
    let pts = [];
    const flush = () => {
      if (pts.length === 1) pts.push(pts[0].replace(/^[\d.]+/, (v) => String(Number(v) + 1)));
      if (pts.length) svg.appendChild(svgEl("polyline", { points: pts.join(" "), class: s.cls }));
      pts = [];
    };
    s.values.forEach((v, i) => {
      if (v === null || !isFinite(v)) flush();
      else pts.push(x(i).toFixed(1) + "," + y(v).toFixed(1));
    });
    flush();
  }
  svg.dataset.points = String(Math.max(0, ...series.map((s) => s.values.filter((v) => v !== null).length)));
}
