// Draws the home page's clearing prices as inline SVG: one small line chart per market (number format),
// each on its own price scale, so that a cheap market is not flattened by a dear one. Needs charts.js; the
// data come from the page (#price-data) and the table under the chart lists the same rounds for readers.
(function () {
  "use strict";
  const holder = document.querySelector("[data-chart-panels]");
  const source = document.getElementById("price-data");
  if (!holder || !source) return;

  const { el, niceMax, valueAxis, COLOURS, number, clock } = window.FleetCharts;
  const W = 360, H = 170, PAD = { left: 58, right: 14, top: 14, bottom: 28 };

  function panel(market, rounds) {
    rounds.sort((a, b) => a.at - b.at);
    const traded = rounds.filter((r) => r.price !== null);
    const colour = COLOURS[market] || "#475467";
    const box = document.createElement("div");
    box.className = "chart-panel";
    const latest = traded.length ? traded[traded.length - 1] : null;
    const head = document.createElement("div");
    head.className = "chart-head";
    head.innerHTML = `<span class="market ${market}"></span><span class="latest"></span>`;
    head.firstChild.textContent = market.toUpperCase();
    head.lastChild.textContent = latest ? `${number.format(latest.price)} µ$/PetaOp` : "no trade yet";
    box.appendChild(head);

    const prices = traded.map((r) => r.price);
    const low = prices.length ? Math.min(...prices) : 0;
    const high = prices.length ? Math.max(...prices) : 0;
    const noTrade = rounds.length - traded.length;
    const label = `Clearing prices of the ${market.toUpperCase()} market over the last ${rounds.length} ` +
      `round${rounds.length === 1 ? "" : "s"}` +
      (traded.length ? `: from ${number.format(low)} to ${number.format(high)} µ$ per PetaOp, ` +
        `latest ${number.format(latest.price)}` : ": no trade") +
      (noTrade && traded.length ? `; ${noTrade} round${noTrade === 1 ? "" : "s"} without a trade` : "") + ".";
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart" });
    svg.appendChild(el("title", {}, label));

    const t0 = rounds[0].at.getTime(), t1 = rounds[rounds.length - 1].at.getTime();
    const top = niceMax(high * 1.1);
    const x = (t) => PAD.left + (t1 === t0 ? (W - PAD.left - PAD.right) / 2 : (t - t0) / (t1 - t0) * (W - PAD.left - PAD.right));
    const y = (p) => H - PAD.bottom - p / top * (H - PAD.top - PAD.bottom);

    valueAxis(svg, { left: PAD.left, right: W - PAD.right, y, top, format: (v) => number.format(Math.round(v)) });
    svg.appendChild(el("text", { x: PAD.left, y: H - 8, class: "tick" }, clock(rounds[0].at)));
    if (t1 !== t0) svg.appendChild(el("text", { x: W - PAD.right, y: H - 8, "text-anchor": "end", class: "tick" }, clock(rounds[rounds.length - 1].at)));

    // Rounds without a trade: a small mark on the time axis.
    for (const r of rounds) {
      if (r.price === null) svg.appendChild(el("circle", { cx: x(r.at.getTime()), cy: H - PAD.bottom, r: 2.5, class: "no-trade" }));
    }
    if (traded.length) {
      const points = traded.map((r) => `${x(r.at.getTime()).toFixed(1)},${y(r.price).toFixed(1)}`).join(" ");
      const area = `${x(traded[0].at.getTime()).toFixed(1)},${y(0)} ${points} ${x(latest.at.getTime()).toFixed(1)},${y(0)}`;
      svg.appendChild(el("polygon", { points: area, fill: colour, "fill-opacity": "0.08" }));
      svg.appendChild(el("polyline", { points, fill: "none", stroke: colour, "stroke-width": 2, "stroke-linejoin": "round" }));
      for (const r of traded) {
        const dot = el("circle", { cx: x(r.at.getTime()), cy: y(r.price), r: 3, fill: colour });
        dot.appendChild(el("title", {}, `${clock(r.at)} UTC: ${number.format(r.price)} µ$/PetaOp`));
        svg.appendChild(dot);
      }
    }
    box.appendChild(svg);
    return box;
  }

  const data = window.FleetCharts.readJson("price-data");
  if (!data) return;
  const markets = new Map();
  for (const row of data) {
    if (!markets.has(row.market)) markets.set(row.market, []);
    markets.get(row.market).push({ at: new Date(row.at), price: row.price });
  }
  for (const market of [...markets.keys()].sort()) holder.appendChild(panel(market, markets.get(market)));
})();
