from rest_framework import authentication, exceptions

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
