"""Logging filters (settings.LOGGING)."""

import logging


class ClientFaultFilter(logging.Filter):
    """A client's malformed input is the client's fault, not a failure of ours: uvicorn logs a text frame that is
    not UTF-8 as an exception with its traceback (and closes the socket with 1007, as it should). That record is
    kept as a one-line warning naming the fault. Installed on the ``uvicorn.error`` logger."""

    CLIENT_FAULTS = ("Invalid UTF-8 sequence received from client",)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and str(record.msg).startswith(self.CLIENT_FAULTS):
            fault = record.exc_info[1]
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "%s (%s); the socket is closed with 1007", (str(record.msg).rstrip(". "), fault)
            record.exc_info = record.exc_text = None
        return True
