"""The API's JSON parser: DRF's, but a body nested deeper than the interpreter recurses is a 400 like any other
bad JSON (DRF turns only a ValueError into one; the RecursionError was a 500 with a traceback)."""

from rest_framework import exceptions, parsers


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - nested too deeply") from None
