"""Start and stop the local Stripe peer (:mod:`billing.localpeer.server`) as a subprocess on a free
loopback port. Used by the embedded runner (``make run``) and the tests; no product module imports it, and
product code reaches the peer only through ``settings.STRIPE_API_BASE``."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Linux: a child started with this gets SIGTERM when its parent ends, however it ends (a benchmark that
    killed its server had left the peer holding the port). The embedded runner's fleet uses it too."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalStripePeer:
    def __init__(self, *, port: int | None = None, log_path=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "LocalStripePeer":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen([sys.executable, "-m", "billing.localpeer.server", "--port", str(self.port)],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                        preexec_fn=die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the local Stripe peer exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/_config/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the local Stripe peer did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        """Stop the peer process this object started (and only it)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def register_webhook(self, *, url: str, secret: str, events: list[str] | None = None) -> None:
        """Ask the peer to deliver its events, signed with ``secret``, to ``url``."""
        import json

        body = json.dumps({"url": url, "secret": secret, **({"events": events} if events else {})}).encode()
        request = urllib.request.Request(f"{self.url}/_config/webhooks/ours", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()

    @classmethod
    def for_embedded_profile(cls, *, webhook_url: str, log_path=None) -> "LocalStripePeer | None":
        """Start the peer where ``settings.STRIPE_API_BASE`` points, if that is a loopback address, and have
        it deliver its events, signed with ``settings.STRIPE_WEBHOOK_SECRET``, to ``webhook_url``. Returns
        None when the settings point at a remote Stripe (nothing to start)."""
        from urllib.parse import urlsplit

        from django.conf import settings

        if not settings.STRIPE_IS_LOCAL_PEER:
            return None
        base = urlsplit(settings.STRIPE_API_BASE)
        peer = cls(port=base.port or 80, log_path=log_path).start()
        peer.register_webhook(url=webhook_url, secret=settings.STRIPE_WEBHOOK_SECRET)
        return peer

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
