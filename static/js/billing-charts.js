// The billing pages' daily bar charts (owner earnings, buyer spend, platform revenue), drawn with the shared
// FleetCharts helpers (charts.js, loaded first). Each chart is a [data-daily-chart] element whose
// data-source names a JSON script of [{day: "2026-11-26", value: <bar height>, label: "<exact amount>"}]; the
// table in the <details> under each chart lists the same days for readers and for printing.
(function () {
  "use strict";
  if (!window.FleetCharts) return;
  const { el, niceMax, valueAxis, readJson } = window.FleetCharts;
  const H = 180, PAD = { left: 58, right: 12, top: 12, bottom: 28 };
  const dayLabel = (iso) => new Date(iso + "T00:00:00Z").toLocaleDateString("en-GB", { day: "2-digit", month: "short", timeZone: "UTC" });

  function draw(holder) {
    const days = readJson(holder.dataset.source);
    if (!days || !days.length) return;
    // As wide as its box (so the labels keep their size on a phone), between 360 and 720 units.
    const W = Math.round(Math.max(360, Math.min(720, holder.clientWidth || 720)));
    const colour = holder.dataset.colour || "#0b7a5a";
    const divisor = Number(holder.dataset.divisor || 1);  // e.g. 100: cents on the bars, dollars on the axis
    const prefix = holder.dataset.prefix || "";
    const top = niceMax(Math.max(...days.map((d) => d.value)) * 1.05);
    const busy = days.filter((d) => d.value > 0).length;
    const label = `${holder.dataset.title || "Per day"} over the last ${days.length} days: ${busy} day${busy === 1 ? "" : "s"} with an amount.`;
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart daily-chart" });
    svg.appendChild(el("title", {}, label));
    const y = (v) => H - PAD.bottom - v / top * (H - PAD.top - PAD.bottom);
    const decimals = top / divisor < 10 ? 2 : 0;  // money: $2.50, $25
    const format = (v) => prefix + (v / divisor).toLocaleString("en-US", {
      minimumFractionDigits: v ? decimals : 0, maximumFractionDigits: decimals });
    valueAxis(svg, { left: PAD.left, right: W - PAD.right, y, top, format });
    const slot = (W - PAD.left - PAD.right) / days.length;
    days.forEach((d, i) => {
      let h = y(0) - y(d.value);
      if (d.value > 0) h = Math.max(h, 1.5);  // a small day stays visible
      const bar = el("rect", { x: (PAD.left + i * slot + slot * 0.15).toFixed(2), y: (y(0) - h).toFixed(2),
                               width: (slot * 0.7).toFixed(2), height: h.toFixed(2), fill: colour, rx: 1.5 });
      bar.appendChild(el("title", {}, `${dayLabel(d.day)}: ${d.label}`));
      svg.appendChild(bar);
    });
    for (const i of [0, Math.floor(days.length / 2), days.length - 1]) {
      const anchor = i === 0 ? "start" : i === days.length - 1 ? "end" : "middle";
      const x = i === 0 ? PAD.left : i === days.length - 1 ? W - PAD.right : PAD.left + (i + 0.5) * slot;
      svg.appendChild(el("text", { x, y: H - 8, "text-anchor": anchor, class: "tick" }, dayLabel(days[i].day)));
    }
    holder.replaceChildren(svg);
  }

  document.querySelectorAll("[data-daily-chart]").forEach(draw);
})();
