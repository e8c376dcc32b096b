from marketplace.errors import ApplicationError


class DispatchError(ApplicationError):
    code = "dispatch_error"
