// Saving a card with Stripe.js (production only; the local Stripe peer uses the billing page's test-card form):
// mount the Payment Element for the SetupIntent, confirm it, and let Stripe send the browser back to our
// return URL, which records the card (billing.payments.card_setup_complete).
(function () {
  "use strict";
  const form = document.getElementById("card-setup");
  if (!form || !window.Stripe) return;
  const stripe = window.Stripe(form.dataset.publishableKey);
  const elements = stripe.elements({ clientSecret: form.dataset.clientSecret });
  elements.create("payment").mount("#payment-element");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const { error } = await stripe.confirmSetup({ elements, confirmParams: { return_url: form.dataset.returnUrl } });
    if (error) {
      const box = document.getElementById("card-setup-error");
      box.textContent = error.message;
      box.hidden = false;
    }
  });
})();
