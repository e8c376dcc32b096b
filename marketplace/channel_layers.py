"""The embedded profile's channel layer: channels' in-memory layer with its expiry sweep amortised.

channels.layers.InMemoryChannelLayer scans every channel and group for expired messages on each send, receive
and group send, so each is O(connections): with thousands of cars on one gateway process, connecting alone
became quadratic (14 connections a second at 8,000 held). The same sweep here runs at most once a second,
which changes only how soon an expired message is dropped (messages expire after 60 s by default)."""

import time

from channels.layers import InMemoryChannelLayer

SWEEP_INTERVAL_S = 1.0


class AmortisedInMemoryChannelLayer(InMemoryChannelLayer):
    _swept_at = 0.0

    def _clean_expired(self):
        now = time.monotonic()
        if now - self._swept_at >= SWEEP_INTERVAL_S:
            self._swept_at = now
            super()._clean_expired()
