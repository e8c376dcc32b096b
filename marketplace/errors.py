from marketplace.core.errors import ApplicationError


class AuctionError(ApplicationError):
    code = "auction_error"
