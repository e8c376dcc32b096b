from marketplace.core.errors import ApplicationError


class BillingError(ApplicationError):
    code = "billing_error"
