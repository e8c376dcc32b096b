// Shared pieces of the site's small SVG charts (no library): element creation, a "nice" axis maximum, the
// markets' colours and number formats. Loaded before any chart script, as window.FleetCharts.
(function () {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
      if (step * power >= value) return step * power;
    }
    return 10 * power;
  }

  // Horizontal grid lines with labels at 0, half and the top of a value axis.
  function valueAxis(svg, { left, right, y, top, format }) {
    for (const fraction of [0, 0.5, 1]) {
      const value = top * fraction, yy = y(value);
      svg.appendChild(el("line", { x1: left, x2: right, y1: yy, y2: yy, class: fraction ? "grid" : "axis" }));
      svg.appendChild(el("text", { x: left - 6, y: yy + 4, "text-anchor": "end", class: "tick" }, format(value)));
    }
  }

  function readJson(id) {
    const source = document.getElementById(id);
    if (!source) return null;
    try { return JSON.parse(source.textContent); } catch (e) { return null; }
  }

  window.FleetCharts = {
    el, niceMax, valueAxis, readJson,
    COLOURS: { int8: "#0b7a5a", fp16: "#7a4cc2", fp32: "#0a5c8a" },
    number: new Intl.NumberFormat("en-US"),
    compact: new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 }),
    clock: (d) => d.toISOString().slice(11, 19),
  };
})();
