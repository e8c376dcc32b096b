// The limits form's small helpers, none needed to use it: "Add a row" for the windows and departures tables
// (a copy of the formset's empty row, numbered, with the formset's TOTAL_FORMS raised), and a search box that
// narrows a long list of buyers to block (ticked ones stay visible).
(function () {
  "use strict";

  document.querySelectorAll("button[data-add-row]").forEach((button) => {
    const prefix = button.dataset.addRow;
    const body = document.querySelector(`tbody[data-rows="${prefix}"]`);
    const template = document.querySelector(`template[data-row-template="${prefix}"]`);
    const total = document.getElementById(`id_${prefix}-TOTAL_FORMS`);
    if (!body || !template || !total) return;
    button.hidden = false;
    button.addEventListener("click", () => {
      const index = Number(total.value);
      const html = template.innerHTML.replace(/__prefix__/g, String(index)).replace(/__number__/g, String(index + 1));
      body.insertAdjacentHTML("beforeend", html);
      total.value = String(index + 1);
      body.lastElementChild.querySelector("select, input")?.focus();
    });
  });

  document.querySelectorAll("input[data-filter-list]").forEach((input) => {
    const list = document.querySelector(input.dataset.filterList);
    if (!list) return;
    input.addEventListener("input", () => {
      const query = input.value.trim().toLowerCase();
      list.querySelectorAll("label").forEach((label) => {
        const box = label.querySelector("input");
        const show = !query || label.textContent.toLowerCase().includes(query) || (box && box.checked);
        (label.parentElement || label).hidden = !show;
      });
    });
  });
})();
