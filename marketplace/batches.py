"""The OpenAI-compatible batch file format, as plain Python (no ORM): reading a file of requests into our
documents, and writing the output and error lines. The services (marketplace.services), the flow that turns a
batch into a job (marketplace.flows.batches) and the API (marketplace.openai_api) build on it.

A batch input file is JSON Lines, one request per line::

    {"custom_id": "req-1", "method": "POST", "url": "/v1/embeddings",
     "body": {"model": "all-minilm-l6-v2", "input": "some text" | ["text", ...], "encoding_format": "float"}}

Each workload maps onto this surface by its module (fleet.workloads): its ``batch_url`` (``/v1/embeddings``,
``/v1/classifications``; generation will be ``/v1/chat/completions``), how a request body becomes documents
and job parameters (``batch_request``) and how its answer is written (``batch_response``).
"""

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable

from fleet import workloads
from fleet.workloads import ModelInfo

#: OpenAI's limits on one batch file, which we keep.
MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
#: A custom_id becomes a document id (at most 256 characters), with "[k]" added for the k-th of a list.
MAX_CUSTOM_ID_CHARS = 240
#: How many line errors a failed batch lists in its ``errors`` (all of them are in its error file).
MAX_ERRORS_LISTED = 50


@dataclass(frozen=True)
class LineError:
    line: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class Request:
    """One valid request: its line number, custom_id, texts and how its answer is written (the workload's
    options, such as an embedding's ``encoding_format``)."""

    line: int
    custom_id: str
    texts: list[str]
    options: dict


@dataclass
class ParsedFile:
    model: str | None = None
    params: dict = field(default_factory=dict)  # the job's parameters, the same in every request
    requests: list[Request] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    file_errors: list[LineError] = field(default_factory=list)  # these fail the whole batch

    @property
    def total(self) -> int:
        return len(self.requests) + len(self.errors)


class BadRequest(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


ENDPOINTS = {w.batch_url: w for w in workloads.WORKLOADS.values()}


def parse(lines: Iterable[bytes], *, endpoint: str, models: dict[str, ModelInfo], max_text_bytes: int) -> ParsedFile:
    """Check every line of a batch file. A bad line becomes a :class:`LineError` (it goes to the error file with
    its number); the file fails as a whole only when it holds more than MAX_REQUESTS requests or no valid one.
    The file's model is the first valid line's: a line naming another model we have is ``mismatched_model``,
    one naming a model we do not have (or one of another task) ``model_not_found``: never served by another.
    So are its parameters (a classifier's labels): a line with others is ``mismatched_params``."""
    spec = ENDPOINTS[endpoint]
    parsed = ParsedFile()
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        custom_id = None
        try:
            try:
                row = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest("invalid_json", f"The line is not valid JSON ({getattr(exc, 'msg', exc)}).")
            if not isinstance(row, dict):
                raise BadRequest("invalid_json", "Each line must be a JSON object.")
            custom_id = row.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                custom_id = None
                raise BadRequest("invalid_custom_id", '"custom_id" must be a non-empty string.', "custom_id")
            if len(custom_id) > MAX_CUSTOM_ID_CHARS:
                raise BadRequest("invalid_custom_id", f'"custom_id" is longer than {MAX_CUSTOM_ID_CHARS} characters.',
                                 "custom_id")
            if custom_id in seen:
                raise BadRequest("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line.",
                                 "custom_id")
            seen.add(custom_id)
            if row.get("method") != "POST":
                raise BadRequest("invalid_method", '"method" must be "POST".', "method")
            if row.get("url") != endpoint:
                raise BadRequest("mismatched_endpoint", f'"url" must be the batch\'s endpoint, {endpoint}.', "url")
            body = row.get("body")
            if not isinstance(body, dict):
                raise BadRequest("invalid_body", '"body" must be a JSON object.', "body")
            name = body.get("model")
            if not isinstance(name, str) or not name:
                raise BadRequest("invalid_model", '"body.model" must be a model name.', "body.model")
            model = models.get(name)
            if model is None or model.task != spec.task:
                raise BadRequest("model_not_found", f"The model {name!r} does not exist here, or does not serve "
                                 f"{endpoint}. See GET /v1/models.", "body.model")
            if parsed.model is not None and name != parsed.model:
                raise BadRequest("mismatched_model", f"Every request of a batch must use one model; this file's is "
                                 f"{parsed.model!r}.", "body.model")
            try:
                texts, params, options = spec.batch_request(body, model)
            except workloads.BadInput as bad:
                raise BadRequest(bad.code, bad.message, bad.param if (bad.param or "").startswith("body")
                                 else f"body.{bad.param}" if bad.param else None)
            if parsed.model is not None and params != parsed.params:
                raise BadRequest("mismatched_params", "Every request of a batch must have the same parameters "
                                 "(labels, head) as its first valid one.", "body")
            limit = spec.max_line_bytes or max_text_bytes
            for text in texts:
                if len(json.dumps(spec.input_row(custom_id + "[0000]", text)).encode()) > limit:
                    raise BadRequest("input_too_large", f"An input is longer than the {limit} bytes a "
                                     "document may have.", "body.input")
        except BadRequest as bad:
            parsed.errors.append(LineError(line=number, custom_id=custom_id, code=bad.code, message=bad.message,
                                           param=bad.param))
            continue
        if parsed.model is None:
            parsed.model, parsed.params = name, params
        parsed.requests.append(Request(line=number, custom_id=custom_id, texts=texts, options=options))
    if parsed.total > MAX_REQUESTS:
        parsed.file_errors.append(LineError(line=0, custom_id=None, code="too_many_requests",
                                            message=f"The file holds {parsed.total} requests; a batch may hold at "
                                                    f"most {MAX_REQUESTS}."))
    elif not parsed.requests:
        parsed.file_errors.append(LineError(line=0, custom_id=None, code="no_valid_requests",
                                            message="The file holds no valid request (see the error file)."
                                            if parsed.errors else "The file holds no request."))
    return parsed


def document_ids(request: Request) -> list[str]:
    """The ids a request's documents carry in the job (what the job page and our results API show): the
    custom_id for a single input, ``custom_id[k]`` for the k-th of a list."""
    if len(request.texts) == 1:
        return [request.custom_id]
    return [f"{request.custom_id}[{k}]" for k in range(len(request.texts))]


def request_line_id(batch_id: str, line: int) -> str:
    """The ``id`` of a request's output or error line (``batch_req_...``), the same every time it is written."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:32]


def output_line(*, batch_id: str, line: int, custom_id: str, body: dict) -> dict:
    """One output line in OpenAI's shape around a response ``body`` (the workload's batch_response)."""
    line_id = request_line_id(batch_id, line)
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": "req_" + line_id[len("batch_req_"):], "body": body},
            "error": None}


def error_line(*, batch_id: str, line: int, custom_id: str | None, code: str, message: str) -> dict:
    """One error-file line: ``error`` carries OpenAI's code and message, and the input's line number."""
    return {"id": request_line_id(batch_id, line), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message, "line": line}}


def jsonl(rows: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for row in rows)
