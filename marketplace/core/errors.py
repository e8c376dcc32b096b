"""The one error base, shared by every app (an app adds its own subclasses, as marketplace.errors and
billing.errors do). Services raise these; the DRF handler and the websocket consumer turn them into
a stable JSON error shape (``{"error": {"code", "message", ...extra}}``) or a protocol error message."""


class ApplicationError(Exception):
    code = "application_error"
    status = 400

    def __init__(self, message: str, *, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.extra = extra or {}

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, **self.extra}


class ValidationFailed(ApplicationError):
    code = "invalid"


class NotFound(ApplicationError):
    code = "not_found"
    status = 404


class Conflict(ApplicationError):
    code = "conflict"
    status = 409
