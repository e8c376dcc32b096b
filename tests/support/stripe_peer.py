"""Helpers for tests against the local Stripe peer (:mod:`billing.localpeer`, started once per session by
``tests/billing/conftest.py`` and emptied before each test): plain HTTP to the peer, and an HTTP client that injects timeouts at the
network boundary (the request reaches the peer, its answer is lost), so retries can be tested for
double charges and double transfers."""

import json
import urllib.request

import stripe  # the test side of the boundary: product code reaches stripe only through billing.stripe_api

from billing.localpeer import LocalStripePeer


class PeerClient:
    """Plain HTTP to the peer, for what a test needs to see or do as Stripe (or the buyer's browser)."""

    def __init__(self, peer: LocalStripePeer, secret_key: str):
        self.url = peer.url
        self.peer = peer
        self.secret_key = secret_key

    def request(self, method: str, path: str, data: dict | None = None) -> dict:
        body = json.dumps(data).encode() if data is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method, headers={
            "Authorization": f"Bearer {self.secret_key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else {}

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def post(self, path: str, data: dict | None = None) -> dict:
        return self.request("POST", path, data or {})

    def flush(self) -> None:
        self.request("DELETE", "/_config/data")

    def onboard(self, account_id: str) -> dict:
        return self.post(f"/_config/accounts/{account_id}/onboard")

    def objects(self, kind: str, **query) -> list[dict]:
        qs = "&".join(f"{k}={v}" for k, v in {"limit": 100, **query}.items())
        return self.get(f"/v1/{kind}?{qs}")["data"]


class LosingHttpClient(stripe.RequestsClient):
    """Sends every request; for the next ``lose`` requests whose method and path match, throws the answer
    away and raises a connection error, as a timeout after the peer acted would."""

    def __init__(self):
        super().__init__()
        self.rules: list[list] = []  # [method, path fragment, how many more to lose]
        self.lost: list[str] = []

    def lose_next(self, method: str, fragment: str, times: int = 1) -> None:
        self.rules.append([method.upper(), fragment, times])

    def request(self, method, url, headers, post_data=None):
        result = super().request(method, url, headers, post_data)
        for rule in self.rules:
            if rule[2] > 0 and method.upper() == rule[0] and rule[1] in url:
                rule[2] -= 1
                self.lost.append(f"{method.upper()} {url}")
                raise stripe.APIConnectionError("injected timeout: the answer was lost")
        return result
