// Keeps a page's live blocks current: every element with data-refresh-url is fetched again every two seconds
// and replaced when its HTML changed. A block is left alone while the pointer is pressed in it, and for good
// once one of its forms is being sent, so that a click never lands on a button that is being replaced. Once a
// block's new HTML holds an element marked data-refresh-final, the page reloads once to show its final state.
(function () {
  "use strict";
  const INTERVAL_MS = 2000;

  function watch(box) {
    let last = "", heldUntil = 0, stopped = false;
    box.addEventListener("pointerdown", () => { heldUntil = Date.now() + 1500; });
    box.addEventListener("submit", () => { stopped = true; });
    window.addEventListener("pagehide", () => { stopped = true; });

    async function tick() {
      if (stopped) return;
      try {
        const response = await fetch(box.dataset.refreshUrl, {
          headers: { "X-Requested-With": "fetch" }, cache: "no-store", credentials: "same-origin" });
        if (response.redirected || response.status === 403 || response.status === 404) {
          // Signed out, or the car is gone: the full page says what happened.
          stopped = true;
          window.location.reload();
          return;
        }
        const html = response.ok ? await response.text() : last;  // a server hiccup: keep what is shown
        if (!stopped && html !== last && Date.now() >= heldUntil) {
          box.innerHTML = html;
          last = html;
          if (box.querySelector("[data-refresh-final]")) {  // e.g. a job that has finished: show its final page
            stopped = true;
            window.location.reload();
            return;
          }
        }
      } catch (e) { /* network hiccup: try again next tick */ }
      setTimeout(tick, INTERVAL_MS);
    }
    setTimeout(tick, INTERVAL_MS);
  }

  document.querySelectorAll("[data-refresh-url]").forEach(watch);
})();
