"""The local Stripe peer's Connect routes behave like Stripe's API reference says."""

import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.django_db


def test_an_express_account_is_inactive_until_onboarding_through_its_account_link(stripe_peer):
    account = stripe_peer.post("/v1/accounts", {"type": "express", "email": "o@example.com",
                                                "capabilities": {"transfers": {"requested": True}}})
    assert account["id"].startswith("acct_") and account["object"] == "account"
    assert (account["charges_enabled"], account["payouts_enabled"], account["details_submitted"]) == (False,) * 3
    assert account["capabilities"] == {"transfers": "inactive"}

    link = stripe_peer.post("/v1/account_links", {"account": account["id"], "type": "account_onboarding",
                                                  "refresh_url": "http://x/refresh", "return_url": "http://x/done"})
    assert link["object"] == "account_link" and link["expires_at"] > link["created"]

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    with pytest.raises(urllib.error.HTTPError) as redirect:
        urllib.request.build_opener(NoRedirect).open(link["url"])
    assert redirect.value.code == 302 and redirect.value.headers["Location"] == "http://x/done"
    account = stripe_peer.get(f"/v1/accounts/{account['id']}")
    assert account["payouts_enabled"] and account["details_submitted"]
    assert account["capabilities"] == {"transfers": "active"}


def test_transfers_need_an_active_destination_list_by_group_and_reverse_at_most_their_amount(stripe_peer):
    account = stripe_peer.post("/v1/accounts", {"type": "express"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        stripe_peer.post("/v1/transfers", {"amount": 100, "currency": "usd", "destination": account["id"]})
    assert refused.value.code == 400
    stripe_peer.onboard(account["id"])

    first = stripe_peer.post("/v1/transfers", {"amount": 1500, "currency": "usd", "destination": account["id"],
                                               "transfer_group": "g1", "metadata": {"payout_id": "7"}})
    stripe_peer.post("/v1/transfers", {"amount": 99, "currency": "usd", "destination": account["id"],
                                       "transfer_group": "g2"})
    assert first["object"] == "transfer" and first["amount_reversed"] == 0 and first["reversed"] is False
    assert [t["id"] for t in stripe_peer.objects("transfers", transfer_group="g1")] == [first["id"]]
    assert stripe_peer.get(f"/v1/transfers/{first['id']}")["metadata"] == {"payout_id": "7"}

    reversal = stripe_peer.post(f"/v1/transfers/{first['id']}/reversals", {"amount": 500})
    assert reversal["object"] == "transfer_reversal" and reversal["transfer"] == first["id"]
    with pytest.raises(urllib.error.HTTPError):
        stripe_peer.post(f"/v1/transfers/{first['id']}/reversals", {"amount": 1001})
    transfer = stripe_peer.get(f"/v1/transfers/{first['id']}")
    assert transfer["amount_reversed"] == 500 and [r["id"] for r in transfer["reversals"]["data"]] == [reversal["id"]]
