"""The settings in their two shapes, each in a process of its own with nothing but its variables: production
(DJANGO_DEBUG=false and its variables, docs/deploy.md) passes `check --deploy`, redirects plain http to https
except the health check, and refuses to start without its secrets; the embedded defaults serve plain http.
Neither creates a directory when the settings are imported."""

import json
import os
import secrets
import subprocess
import sys

import pytest
from django.conf import settings

pytestmark = pytest.mark.pure  # subprocesses that open no database, layer or broker

ROOT = settings.BASE_DIR
# What a production deployment sets (docs/deploy.md). The hosts are .invalid: nothing here may connect to them.
PRODUCTION = {
    "DJANGO_DEBUG": "false",
    "DJANGO_ALLOWED_HOSTS": "market.example.com",
    "DJANGO_CSRF_TRUSTED_ORIGINS": "https://market.example.com",
    "DATABASE_URL": "postgres://app:secret@db.invalid:5432/marketplace",
    "REDIS_URL": "redis://redis.invalid:6379/0",
    "STRIPE_API_BASE": "https://api.stripe.com",
    "STRIPE_SECRET_KEY": "sk_live_not_a_secret",
    "STRIPE_WEBHOOK_SECRET": "whsec_not_a_secret",
}

# Requests through the security middleware alone (no view, no database): plain http, the same request as the
# proxy forwards it from https, and a probe of the health check.
REQUESTS = """
import json
import django
django.setup()
from django.conf import settings
from django.http import HttpResponse
from django.middleware.security import SecurityMiddleware
from django.test import RequestFactory

middleware = SecurityMiddleware(lambda request: HttpResponse("ok"))
def answer(path, **headers):
    response = middleware(RequestFactory().get(path, HTTP_HOST="market.example.com", **headers))
    return [response.status_code, response.get("Location"), response.get("Strict-Transport-Security")]
print(json.dumps({
    "plain": answer("/api/v1/jobs/"),
    "proxied": answer("/api/v1/jobs/", HTTP_X_FORWARDED_PROTO="https"),
    "probe": answer("/healthz"),
    "cookies_secure": [settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE],
}))
"""

# Django started with every os.mkdir recorded (Path.mkdir and os.makedirs go through it), even of a directory
# that already exists.
STARTUP = """
import os
made = []
real_mkdir = os.mkdir
def recording_mkdir(path, *args, **kwargs):
    made.append(os.fspath(path))
    return real_mkdir(path, *args, **kwargs)
os.mkdir = recording_mkdir
import django
django.setup()
from django.conf import settings
assert str(settings.VAR_DIR) == os.environ["VAR_DIR"], settings.VAR_DIR
print(made)
"""


def run(args: list[str], tmp_path, cwd=ROOT, **variables) -> subprocess.CompletedProcess:
    """Run Python in a fresh process whose environment holds only ``variables`` (not the test run's own)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
           "DJANGO_SETTINGS_MODULE": "marketplace.settings", **variables}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def production(**overrides) -> dict:
    return {**PRODUCTION, "DJANGO_SECRET_KEY": secrets.token_urlsafe(50), **overrides}


@pytest.mark.parametrize("preload", ["", "true"], ids=["preload-default", "preload-on"])
def test_check_deploy_finds_nothing_to_warn_about_with_the_production_variables(tmp_path, preload):
    # Given the production variables (with HSTS preloading left at its default, or switched on),
    variables = production(**({"DJANGO_SECURE_HSTS_PRELOAD": preload} if preload else {}))
    # when Django's deployment checklist runs, failing on any warning,
    check = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], tmp_path, **variables)
    # then it passes without a single warning.
    assert check.returncode == 0, check.stdout + check.stderr
    assert "System check identified no issues" in check.stdout
    assert "WARNING" not in check.stdout + check.stderr


@pytest.mark.parametrize("secret", ["DJANGO_SECRET_KEY", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"])
def test_production_without_one_of_its_secrets_fails_at_start(tmp_path, secret):
    variables = production()
    del variables[secret]
    check = run(["manage.py", "check"], tmp_path, **variables)
    assert check.returncode != 0
    assert "ImproperlyConfigured" in check.stderr and secret in check.stderr


def test_production_redirects_plain_http_to_https_but_answers_the_health_probe_and_sets_secure_cookies(tmp_path):
    # Given the production settings,
    answered = run(["-c", REQUESTS], tmp_path, **production())
    assert answered.returncode == 0, answered.stderr
    result = json.loads(answered.stdout)
    # a plain http request is sent to https,
    assert result["plain"][:2] == [301, "https://market.example.com/api/v1/jobs/"]
    # the request the proxy forwards from https is served, with HSTS for a year over the subdomains,
    assert result["proxied"] == [200, None, "max-age=31536000; includeSubDomains"]
    # the load balancer's probe of the health check is answered over http,
    assert result["probe"] == [200, None, None]
    # and the session and CSRF cookies are https-only.
    assert result["cookies_secure"] == [True, True]


def test_the_embedded_defaults_serve_plain_http(tmp_path):
    # Given no variables at all (`make run`, the test suite and the processes it starts),
    answered = run(["-c", REQUESTS], tmp_path)
    assert answered.returncode == 0, answered.stderr
    result = json.loads(answered.stdout)
    # then plain http is served, without HSTS, and the cookies travel over http.
    assert result["plain"] == [200, None, None]
    assert result["cookies_secure"] == [False, False]


@pytest.mark.parametrize("profile", ["embedded", "production"])
def test_starting_django_creates_no_directory(tmp_path, profile):
    # Given an empty working directory and a var location that does not exist yet,
    cwd, var = tmp_path / "cwd", tmp_path / "var"
    cwd.mkdir()
    variables = {"VAR_DIR": str(var), **(production() if profile == "production" else {})}
    # when Django starts (settings imported, apps loaded) there,
    started = run(["-c", STARTUP], tmp_path, cwd=cwd, **variables)
    assert started.returncode == 0, started.stderr
    # then it made no directory: neither the var location nor any other, and left the working directory empty.
    assert started.stdout.strip() == "[]"
    assert not var.exists()
    assert list(cwd.iterdir()) == []
