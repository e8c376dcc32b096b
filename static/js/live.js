// Refreshes the job's progress block every two seconds while the job is open.
(function () {
  const box = document.getElementById("progress");
  if (!box) return;
  async function refresh() {
    const state = box.querySelector("[data-state]")?.dataset.state;
    if (state !== "queued" && state !== "running") return;
    try {
      const response = await fetch(box.dataset.url, { headers: { "X-Requested-With": "fetch" } });
      if (response.ok) box.innerHTML = await response.text();
    } catch (e) { /* network hiccup: try again next tick */ }
    setTimeout(refresh, 2000);
  }
  setTimeout(refresh, 2000);
})();
