// The new-job page: reads the chosen JSON Lines file in the browser (streamed, with a progress bar) to count
// its documents and characters, asks the server for an estimate of cost and completion time whenever the
// model, the bid or the file changes, and sends the form with an upload progress bar. Without JavaScript the
// form still posts normally; the server checks every line either way.
(function () {
  "use strict";
  const form = document.getElementById("new-job");
  if (!form) return;
  const estimateBox = document.querySelector("[data-estimate]");
  const statsBox = form.querySelector("[data-file-stats]");
  const statsBar = statsBox.querySelector(".bar");
  const statsText = statsBox.querySelector("[data-file-stats-text]");
  const uploadBox = form.querySelector("[data-upload]");
  const number = new Intl.NumberFormat("en-US");
  let stats = null, reading = 0, timer = null;

  function setBar(bar, fraction) {
    const pct = Math.max(0, Math.min(100, Math.round(fraction * 100)));
    bar.setAttribute("aria-valuenow", String(pct));
    bar.querySelector("span").style.width = pct + "%";
    return pct;
  }

  // Documents are the non-blank lines; characters are counted as bytes (close enough for an estimate).
  async function readStats(file, token) {
    const reader = file.stream().getReader();
    let docs = 0, chars = 0, seen = 0, lineHasText = false;
    statsBox.hidden = false;
    for (;;) {
      const { done, value } = await reader.read();
      if (token !== reading) { reader.cancel(); return null; }  // another file was chosen meanwhile
      if (done) break;
      for (let i = 0; i < value.length; i++) {
        const byte = value[i];
        if (byte === 10) { if (lineHasText) docs++; lineHasText = false; }
        else if (byte !== 13 && byte !== 32 && byte !== 9) { lineHasText = true; chars++; }
      }
      seen += value.length;
      setBar(statsBar, file.size ? seen / file.size : 1);
      statsText.textContent = `Reading ${file.name}: ${number.format(seen)} of ${number.format(file.size)} bytes`;
    }
    if (lineHasText) docs++;
    statsText.textContent = `${file.name}: ${number.format(docs)} documents, ${number.format(file.size)} bytes`;
    return { docs, chars };
  }

  async function refreshEstimate() {
    if (!stats || !stats.docs) {
      estimateBox.innerHTML = '<p class="empty">The file holds no documents yet: each line is one JSON object.</p>';
      return;
    }
    const params = new URLSearchParams({
      model: form.elements.model.value, precision: form.elements.precision.value,
      max_price_per_unit: form.elements.max_price_per_unit.value, docs: stats.docs, chars: stats.chars,
      budget_cap: form.elements.budget_cap.value });
    try {
      const response = await fetch(`${form.dataset.estimateUrl}?${params}`, { headers: { "X-Requested-With": "fetch" } });
      estimateBox.innerHTML = await response.text();
    } catch (e) {
      estimateBox.innerHTML = '<p class="empty">The estimate is not available right now; you can still create the job.</p>';
    }
  }

  function later() {
    clearTimeout(timer);
    timer = setTimeout(refreshEstimate, 300);
  }

  form.elements.inputs.addEventListener("change", async () => {
    const file = form.elements.inputs.files[0];
    const token = ++reading;
    stats = null;
    if (!file) { statsBox.hidden = true; return; }
    const counted = await readStats(file, token);
    if (counted) { stats = counted; refreshEstimate(); }
  });
  for (const name of ["model", "precision", "max_price_per_unit", "budget_cap"]) {
    form.elements[name].addEventListener("input", later);
    form.elements[name].addEventListener("change", later);
  }

  // Each model has its own price unit (per million tokens, per thousand pages): the bid field says which, a
  // precision the model does not run at gives way to one it does, and a suggested bid the buyer has not changed
  // follows the model and precision chosen.
  const suggestionsNode = document.getElementById("bid-suggestions");
  const suggestions = suggestionsNode ? JSON.parse(suggestionsNode.textContent) : {};
  const price = form.elements.max_price_per_unit;
  const priceLabel = form.querySelector('label[for="' + price.id + '"]');
  let priceTouched = false;
  price.addEventListener("input", () => { priceTouched = true; });
  function followModel() {
    const entry = suggestions[form.elements.model.value];
    if (!entry) return;
    if (priceLabel) priceLabel.textContent = "Maximum price, $ " + entry.unit;
    const precisions = Object.keys(entry.bids);  // a model runs only at these (OCR: FP32)
    if (!precisions.includes(form.elements.precision.value)) form.elements.precision.value = precisions[0];
    const bid = entry.bids[form.elements.precision.value];
    if (!priceTouched && bid !== undefined) price.value = bid;
  }
  form.elements.model.addEventListener("change", followModel);
  form.elements.precision.addEventListener("change", followModel);
  followModel();

  // Upload with progress. The server answers a good job with 201 and the job page's address, and a bad one with
  // this page again, errors shown, which replaces the page.
  form.addEventListener("submit", (event) => {
    if (!window.XMLHttpRequest || !window.FormData) return;
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    uploadBox.hidden = false;
    const bar = uploadBox.querySelector(".bar"), pct = uploadBox.querySelector("[data-upload-pct]");
    const text = uploadBox.querySelector("[data-upload-text]");
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action || window.location.href);
    xhr.setRequestHeader("X-Requested-With", "fetch");
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) pct.textContent = setBar(bar, e.loaded / e.total) + " %";
    });
    xhr.upload.addEventListener("load", () => {
      pct.textContent = setBar(bar, 1) + " %";
      text.textContent = "Uploaded. Checking every line and cutting the work into units…";
    });
    xhr.addEventListener("load", () => {
      if (xhr.status === 201) {
        window.location.assign(JSON.parse(xhr.responseText).location);
        return;
      }
      document.open();
      document.write(xhr.responseText);
      document.close();
    });
    xhr.addEventListener("error", () => {
      button.disabled = false;
      text.textContent = "The upload failed (network). Nothing was created; try again.";
    });
    xhr.send(new FormData(form));
  });
})();
