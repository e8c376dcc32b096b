"""The local Stripe peer: localstripe plus the Stripe Connect routes we use, on loopback.

localstripe (a real, Stripe-compatible HTTP server) covers customers, payment methods, payment intents,
setup intents, refunds and signed webhooks. It has no Connect, so this module adds, shaped after Stripe's
API reference (https://docs.stripe.com/api):

- ``POST /v1/accounts``, ``GET /v1/accounts/{id}``: Express accounts (``type``, ``country``, ``email``,
  ``capabilities``, ``metadata``; ``charges_enabled``, ``payouts_enabled``, ``details_submitted``).
- ``POST /v1/account_links``: onboarding links. The link's ``url`` points back at this peer; opening it
  (``/_config/onboarding/<token>``, outside localstripe's key check, as a browser opens it) completes
  onboarding (as if the owner filled in Stripe's form), sends ``account.updated`` and redirects to
  ``return_url``. ``POST /_config/accounts/{id}/onboard`` does the same for tests.
- ``POST /v1/transfers``, ``GET /v1/transfers/{id}``, ``GET /v1/transfers`` (``destination``,
  ``transfer_group``, ``limit``, ``starting_after``); ``transfer.created`` events.
- ``POST /v1/transfers/{id}/reversals``, ``GET /v1/transfers/{id}/reversals``; ``transfer.reversed``.

Like localstripe itself the peer ignores idempotency keys. Development and test tooling only: no product
module imports it; the embedded runner and the tests start it as a subprocess through
:mod:`billing.localpeer`. Run it alone with ``python -m billing.localpeer.server --port 8420``.
"""

import argparse
import logging
import socket
import time

from aiohttp import web
from localstripe import resources
from localstripe.errors import UserError
from localstripe.resources import Event, List, StripeObject, random_id, store, try_convert_to_int
from localstripe.server import api_extra, app, get_post_data, json_response, unflatten_data
from localstripe.webhooks import schedule_webhook

# localstripe pickles its whole store to one fixed path (/tmp/localstripe.pickle) on every write; two
# peers on one machine would then share and overwrite each other's state. This peer keeps state in memory.
resources.Store.dump_to_disk = lambda self: None
resources.Store.try_load_from_disk = lambda self: None


def _bad(message="Bad request", **contents):
    return UserError(400, message, contents or None)


class Account(StripeObject):
    object = "account"
    _id_prefix = "acct_"

    def __init__(self, type=None, country="US", email=None, capabilities=None, business_type=None,
                 metadata=None, **kwargs):
        if kwargs:
            raise _bad("Unexpected " + ", ".join(kwargs))
        if type not in ("express", "standard", "custom"):
            raise _bad("type must be one of express, standard, custom", param="type")
        super().__init__()
        self.type = type
        self.country = country
        self.email = email
        self.business_type = business_type
        self.default_currency = "usd"
        self.metadata = metadata or {}
        self.capabilities = {name: "inactive" for name in (capabilities or {"transfers": {}})}
        self.charges_enabled = False
        self.payouts_enabled = False
        self.details_submitted = False
        self.requirements = {"currently_due": ["external_account", "tos_acceptance.date"], "disabled_reason":
                             "requirements.past_due", "past_due": [], "eventually_due": []}

    def _onboard(self):
        self.details_submitted = True
        self.charges_enabled = True
        self.payouts_enabled = True
        self.capabilities = {name: "active" for name in self.capabilities}
        self.requirements = {"currently_due": [], "disabled_reason": None, "past_due": [], "eventually_due": []}
        schedule_webhook(Event("account.updated", self))


class TransferReversal(StripeObject):
    object = "transfer_reversal"
    _id_prefix = "trr_"

    def __init__(self, transfer, amount, metadata=None):
        super().__init__()
        self.transfer = transfer.id
        self.amount = amount
        self.currency = transfer.currency
        self.metadata = metadata or {}
        self.destination_payment_refund = None
        self.source_refund = None


class Transfer(StripeObject):
    object = "transfer"
    _id_prefix = "tr_"

    def __init__(self, amount=None, currency=None, destination=None, transfer_group=None, description=None,
                 metadata=None, source_transaction=None, **kwargs):
        if kwargs:
            raise _bad("Unexpected " + ", ".join(kwargs))
        amount = try_convert_to_int(amount)
        if not isinstance(amount, int) or amount <= 0:
            raise _bad("amount must be a positive integer", param="amount")
        if not isinstance(currency, str) or not currency:
            raise _bad("currency is required", param="currency")
        if not isinstance(destination, str):
            raise _bad("destination is required", param="destination")
        account = Account._api_retrieve(destination)
        if account.capabilities.get("transfers") != "active":
            raise _bad("Your destination account needs to have the transfers capability enabled.",
                       code="insufficient_capabilities_for_transfer", param="destination")
        super().__init__()
        self.amount = amount
        self.currency = currency.lower()
        self.destination = destination
        self.transfer_group = transfer_group
        self.description = description
        self.metadata = metadata or {}
        self.source_transaction = source_transaction
        self.destination_payment = "py_" + random_id(14)
        self.balance_transaction = "txn_" + random_id(14)
        self._reversals = []
        schedule_webhook(Event("transfer.created", self))

    @property
    def amount_reversed(self):
        return sum(r.amount for r in self._reversals)

    @property
    def reversed(self):
        return self.amount_reversed >= self.amount

    @property
    def reversals(self):
        li = List(f"/v1/transfers/{self.id}/reversals", limit=100)
        li._list = list(self._reversals)
        return li

    @classmethod
    def _api_list_all(cls, url, destination=None, transfer_group=None, limit=None, starting_after=None,
                      created=None, **kwargs):
        if kwargs:
            raise _bad("Unexpected " + ", ".join(kwargs))
        li = super()._api_list_all(url, limit=limit, starting_after=starting_after)
        li._list = [t for t in li._list if (destination is None or t.destination == destination)
                    and (transfer_group is None or t.transfer_group == transfer_group)]
        li._list.sort(key=lambda t: t.created, reverse=True)
        return li

    @classmethod
    def _api_reverse(cls, id, amount=None, metadata=None, description=None, refund_application_fee=None,
                     **kwargs):
        if kwargs:
            raise _bad("Unexpected " + ", ".join(kwargs))
        transfer = cls._api_retrieve(id)
        remaining = transfer.amount - transfer.amount_reversed
        amount = remaining if amount is None else try_convert_to_int(amount)
        # Stripe refuses a reversal above what is left of the transfer; so does the peer. Our code checks
        # before it asks and never relies on this refusal.
        if not isinstance(amount, int) or amount <= 0 or amount > remaining:
            raise _bad("Amount exceeds the transfer's unreversed amount.", param="amount")
        reversal = TransferReversal(transfer, amount, metadata)
        transfer._reversals.append(reversal)
        schedule_webhook(Event("transfer.reversed", transfer))
        return reversal

    @classmethod
    def _api_list_reversals(cls, id, limit=None, starting_after=None, **kwargs):
        transfer = cls._api_retrieve(id)
        li = List(f"/v1/transfers/{id}/reversals", limit=limit, starting_after=starting_after)
        li._list = list(transfer._reversals)
        return li


class _AccountLink:
    """Account links are not stored objects in Stripe either: a one-time URL with an expiry."""

    def __init__(self, data):
        self.data = data

    def _export(self, expand=None):
        return self.data


def _account_link_create(account=None, refresh_url=None, return_url=None, type=None, collect=None,
                         base_url="", **kwargs):
    if kwargs:
        raise _bad("Unexpected " + ", ".join(kwargs))
    if type not in ("account_onboarding", "account_update"):
        raise _bad("type must be account_onboarding or account_update", param="type")
    if not refresh_url or not return_url:
        raise _bad("refresh_url and return_url are required")
    Account._api_retrieve(account)
    now = int(time.time())
    token = random_id(24)
    _links[token] = (account, return_url)
    return _AccountLink({"object": "account_link", "created": now, "expires_at": now + 300,
                         "url": f"{base_url}/_config/onboarding/{token}"})


_links: dict[str, tuple[str, str]] = {}


async def account_link_create(request):
    data = await get_post_data(request) or {}
    data.pop("expand", None)
    base_url = f"{request.scheme}://{request.host}"
    return json_response(_account_link_create(base_url=base_url, **data)._export())


async def onboarding_complete(request):
    """What the owner's browser reaches from the account link: onboarding succeeds, back to our site."""
    account_id, return_url = _links.pop(request.match_info["token"], (None, None))
    if account_id is None:
        raise UserError(404, "This account link has expired or was used")
    Account._api_retrieve(account_id)._onboard()
    raise web.HTTPFound(return_url)


async def onboard_for_tests(request):
    account = Account._api_retrieve(request.match_info["id"])
    account._onboard()
    return json_response(account._export())


async def _health(request):
    return web.json_response({"ok": True})


def _register_routes():
    def create(cls):
        async def f(request):
            data = await get_post_data(request) or {}
            expand = data.pop("expand", None)
            return json_response(cls(**data)._export(expand=expand))
        return f

    def retrieve(cls):
        def f(request):
            return json_response(cls._api_retrieve(request.match_info["id"])._export())
        return f

    def list_all(cls, url):
        def f(request):
            data = unflatten_data(request.query)
            data.pop("expand", None)
            return json_response(cls._api_list_all(url, **data)._export())
        return f

    router = app.router
    router.add_post("/v1/accounts", create(Account))
    router.add_get("/v1/accounts/{id}", retrieve(Account))
    router.add_post("/v1/account_links", account_link_create)
    router.add_post("/v1/transfers/{id}/reversals", api_extra(Transfer._api_reverse, None))
    router.add_get("/v1/transfers/{id}/reversals", api_extra(Transfer._api_list_reversals, None))
    router.add_post("/v1/transfers", create(Transfer))
    router.add_get("/v1/transfers/{id}", retrieve(Transfer))
    router.add_get("/v1/transfers", list_all(Transfer, "/v1/transfers"))
    router.add_get("/_config/onboarding/{token}", onboarding_complete)
    router.add_post("/_config/accounts/{id}/onboard", onboard_for_tests)
    router.add_get("/_config/health", _health)


_register_routes()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8420)
    args = parser.parse_args(argv)
    store.clear()
    logging.basicConfig(level=logging.WARNING)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    web.run_app(app, sock=sock, access_log=None, print=None)


if __name__ == "__main__":
    main()
