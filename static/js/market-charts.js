// The market page's capacity charts (needs charts.js): per market, offered against sold capacity over time
// (rounds grouped into at most BUCKETS time slices), and the depth of supply now: a step curve of the
// capacity offered at or below each reserve price. Data come from the page (#capacity-data, #depth-data); the
// tables under the charts list the same figures for readers.
(function () {
  "use strict";
  if (!window.FleetCharts) return;
  const { el, niceMax, valueAxis, COLOURS, compact, number, clock, readJson } = window.FleetCharts;
  const W = 360, H = 170, PAD = { left: 58, right: 14, top: 14, bottom: 28 };
  const BUCKETS = 40;

  function frame(label) {
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart" });
    svg.appendChild(el("title", {}, label));
    return svg;
  }

  function panel(market, svg, note) {
    const box = document.createElement("div");
    box.className = "chart-panel";
    const head = document.createElement("div");
    head.className = "chart-head";
    head.innerHTML = `<span class="market ${market}"></span><span class="latest"></span>`;
    head.firstChild.textContent = market.toUpperCase();
    head.lastChild.textContent = note;
    box.append(head, svg);
    return box;
  }

  function capacityPanel(market, rounds) {
    rounds.sort((a, b) => a.at - b.at);
    const t0 = rounds[0].at.getTime(), t1 = rounds[rounds.length - 1].at.getTime();
    const span = Math.max(1, t1 - t0), width = span / BUCKETS;
    const buckets = Array.from({ length: BUCKETS }, () => ({ offered: 0, sold: 0, rounds: 0 }));
    for (const r of rounds) {
      const b = buckets[Math.min(BUCKETS - 1, Math.floor((r.at.getTime() - t0) / width))];
      b.offered += r.offered; b.sold += r.sold; b.rounds++;
    }
    const offered = rounds.reduce((s, r) => s + r.offered, 0), sold = rounds.reduce((s, r) => s + r.sold, 0);
    const share = offered ? Math.round(100 * sold / offered) : 0;
    const svg = frame(`${market.toUpperCase()}: ${compact.format(offered)} mega-ops offered and ${compact.format(sold)} ` +
                      `sold (${share} %) over ${rounds.length} rounds`);
    const top = niceMax(Math.max(...buckets.map((b) => b.offered)) * 1.05);
    const y = (v) => H - PAD.bottom - v / top * (H - PAD.top - PAD.bottom);
    valueAxis(svg, { left: PAD.left, right: W - PAD.right, y, top, format: (v) => compact.format(v) });
    const step = (W - PAD.left - PAD.right) / BUCKETS, colour = COLOURS[market] || "#475467";
    buckets.forEach((b, i) => {
      if (!b.rounds) return;
      const x = PAD.left + i * step + 1;
      svg.appendChild(el("rect", { x, y: y(b.offered), width: step - 2, height: y(0) - y(b.offered), fill: colour, "fill-opacity": 0.18 }));
      const bar = el("rect", { x, y: y(b.sold), width: step - 2, height: y(0) - y(b.sold), fill: colour });
      bar.appendChild(el("title", {}, `${b.rounds} rounds: ${number.format(b.offered)} offered, ${number.format(b.sold)} sold (mega-ops)`));
      svg.appendChild(bar);
    });
    svg.appendChild(el("text", { x: PAD.left, y: H - 8, class: "tick" }, clock(rounds[0].at)));
    svg.appendChild(el("text", { x: W - PAD.right, y: H - 8, "text-anchor": "end", class: "tick" }, clock(rounds[rounds.length - 1].at)));
    return panel(market, svg, `${share} % sold`);
  }

  function depthPanel(market, steps) {
    let total = 0;
    const points = steps.map(([price, rate]) => ({ price, cumulative: (total += rate) }));
    const high = points[points.length - 1].price, top = niceMax(high * 1.1), right = niceMax(total * 1.05);
    const svg = frame(`${market.toUpperCase()} supply now: ${number.format(Math.round(total))} mega-ops per second from ` +
                      `reserves of ${number.format(points[0].price)} to ${number.format(high)} µ$ per PetaOp`);
    const x = (c) => PAD.left + c / right * (W - PAD.left - PAD.right);
    const y = (p) => H - PAD.bottom - p / top * (H - PAD.top - PAD.bottom);
    valueAxis(svg, { left: PAD.left, right: W - PAD.right, y, top, format: (v) => compact.format(v) });
    // A step curve: capacity up to x is offered at reserves of at most y.
    let path = `M ${x(0)} ${y(points[0].price)}`, previous = 0;
    for (const p of points) {
      path += ` L ${x(previous).toFixed(1)} ${y(p.price).toFixed(1)} L ${x(p.cumulative).toFixed(1)} ${y(p.price).toFixed(1)}`;
      previous = p.cumulative;
    }
    const colour = COLOURS[market] || "#475467";
    svg.appendChild(el("path", { d: path, fill: "none", stroke: colour, "stroke-width": 2 }));
    svg.appendChild(el("text", { x: PAD.left, y: H - 8, class: "tick" }, "0"));
    svg.appendChild(el("text", { x: W - PAD.right, y: H - 8, "text-anchor": "end", class: "tick" }, `${compact.format(right)} Mops/s`));
    return panel(market, svg, `${compact.format(total)} mega-ops/s offered`);
  }

  const capacity = readJson("capacity-data"), capacityHolder = document.querySelector("[data-capacity-panels]");
  if (capacity && capacityHolder) {
    const markets = new Map();
    for (const r of capacity) {
      if (!markets.has(r.market)) markets.set(r.market, []);
      markets.get(r.market).push({ at: new Date(r.at), offered: r.offered, sold: r.sold });
    }
    for (const market of [...markets.keys()].sort()) capacityHolder.appendChild(capacityPanel(market, markets.get(market)));
  }
  const depth = readJson("depth-data"), depthHolder = document.querySelector("[data-depth-panels]");
  if (depth && depthHolder) {
    for (const d of depth) if (d.steps.length) depthHolder.appendChild(depthPanel(d.market, d.steps));
  }
})();
