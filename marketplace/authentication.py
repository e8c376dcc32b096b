from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, throttling
from rest_framework.settings import api_settings

from marketplace.models import ApiKey
from marketplace.services import api_key_authenticate


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer mk_...``: the request acts for the key's organisation; ``request.auth`` is the
    key and ``request.user`` the member who created it."""

    keyword = "bearer"

    def authenticate(self, request):
        scheme, _, secret = authentication.get_authorization_header(request).decode("latin-1").partition(" ")
        if scheme.lower() != self.keyword or not secret.startswith("mk_"):
            return None
        key = api_key_authenticate(secret=secret.strip())
        if key is None or key.created_by is None or not key.created_by.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        return key.created_by, key

    def authenticate_header(self, request):
        return 'Bearer realm="api"'


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "mk_<prefix>_<secret>",
                "description": "An organisation's API key (buyer page, or `manage.py issue_api_key EMAIL`)."}


class ApiKeyRateThrottle(throttling.SimpleRateThrottle):
    """Requests per API key (per user for a signed-in session), at ``DEFAULT_THROTTLE_RATES["api_key"]``.
    Anonymous requests (the public catalogue, the cars' pairing) are not counted here. The counts live in the
    cache, which is Redis in the services profile, so every process shares them."""

    scope = "api_key"

    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES[self.scope]  # read per request, so settings changes apply

    def get_cache_key(self, request, view):
        if isinstance(request.auth, ApiKey):
            ident = f"key:{request.auth.prefix}"
        elif request.user and request.user.is_authenticated:
            ident = f"user:{request.user.pk}"
        else:
            return None
        return self.cache_format % {"scope": self.scope, "ident": ident}
