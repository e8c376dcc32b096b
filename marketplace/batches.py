"""The OpenAI-compatible batch file format, as plain Python (no ORM): reading a file of requests into our
documents, and writing the output and error lines. The services (marketplace.services), the flow that turns a
batch into a job (marketplace.flows.batches) and the API (marketplace.openai_api) build on it.

A batch input file is JSON Lines, one request per line::

    {"custom_id": "req-1", "method": "POST", "url": "/v1/embeddings",
     "body": {"model": "all-minilm-l6-v2", "input": "some text" | ["text", ...], "encoding_format": "float"}}

Each workload maps onto this surface through one :class:`Endpoint`: its URL, the catalogue task it runs and
how a request body becomes documents. Embeddings are the first; generation will be ``/v1/chat/completions``,
and classification and OCR our own documented endpoint names in the same file format.
"""

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

#: OpenAI's limits on one batch file, which we keep.
MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
#: OpenAI's limit on the inputs of one embeddings request.
MAX_INPUTS_PER_REQUEST = 2048
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
    """One valid request: its line number, custom_id, texts and how its vectors are written."""

    line: int
    custom_id: str
    texts: list[str]
    encoding_format: str  # float | base64


@dataclass
class ParsedFile:
    model: str | None = None
    requests: list[Request] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    file_errors: list[LineError] = field(default_factory=list)  # these fail the whole batch

    @property
    def total(self) -> int:
        return len(self.requests) + len(self.errors)


@dataclass(frozen=True)
class ModelInfo:
    """What the parser needs to know of a catalogue model."""

    slug: str
    task: str
    dims: int


class BadRequest(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _embedding_texts(body: dict, model: ModelInfo) -> tuple[list[str], str]:
    """An embeddings body's texts and encoding format (``input``: a string, or a list of strings, each one
    document of its own)."""
    value = body.get("input")
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        texts = value
    elif isinstance(value, list) and value and all(isinstance(t, (int, list)) for t in value):
        raise BadRequest("invalid_input", "Token arrays are not supported: send the input as text.", "body.input")
    else:
        raise BadRequest("invalid_input", '"input" must be a non-empty string or a non-empty list of strings.',
                         "body.input")
    if len(texts) > MAX_INPUTS_PER_REQUEST:
        raise BadRequest("invalid_input", f"At most {MAX_INPUTS_PER_REQUEST} inputs per request.", "body.input")
    if any(not t.strip() for t in texts):
        raise BadRequest("invalid_input", "An input is empty.", "body.input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("invalid_encoding_format", '"encoding_format" must be "float" or "base64".',
                         "body.encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != model.dims:
        raise BadRequest("unsupported_dimensions", f"{model.slug} returns {model.dims} dimensions; "
                         f"dimensions={dimensions!r} is not supported.", "body.dimensions")
    return texts, encoding


@dataclass(frozen=True)
class Endpoint:
    url: str
    task: str  # the catalogue task (marketplace.models.WORKLOAD_CATEGORIES) whose models serve it
    texts: Callable[[dict, ModelInfo], tuple[list[str], str]]


ENDPOINTS = {e.url: e for e in [Endpoint(url="/v1/embeddings", task="embedding", texts=_embedding_texts)]}


def parse(lines: Iterable[bytes], *, endpoint: str, models: dict[str, ModelInfo], max_text_bytes: int) -> ParsedFile:
    """Check every line of a batch file. A bad line becomes a :class:`LineError` (it goes to the error file with
    its number); the file fails as a whole only when it holds more than MAX_REQUESTS requests or no valid one.
    The file's model is the first valid line's: a line naming another model we have is ``mismatched_model``,
    one naming a model we do not have (or one of another task) ``model_not_found``: never served by another."""
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
            texts, encoding = spec.texts(body, model)
            for text in texts:
                if len(json.dumps({"id": custom_id + "[0000]", "text": text}).encode()) > max_text_bytes:
                    raise BadRequest("input_too_large", f"An input is longer than the {max_text_bytes} bytes a "
                                     "document may have.", "body.input")
        except BadRequest as bad:
            parsed.errors.append(LineError(line=number, custom_id=custom_id, code=bad.code, message=bad.message,
                                           param=bad.param))
            continue
        parsed.model = parsed.model or name
        parsed.requests.append(Request(line=number, custom_id=custom_id, texts=texts, encoding_format=encoding))
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


def output_line(*, batch_id: str, line: int, custom_id: str, model: str, vectors: list[str], encoding_format: str,
                tokens: int) -> dict:
    """One output line in OpenAI's shape. ``vectors`` are base64 little-endian float32 (as the cars return
    them), written as they are for ``base64`` and as lists of floats for ``float``."""
    data = []
    for index, encoded in enumerate(vectors):
        embedding = (encoded if encoding_format == "base64"
                     else np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist())
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    line_id = request_line_id(batch_id, line)
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": "req_" + line_id[len("batch_req_"):],
                         "body": {"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}},
            "error": None}


def error_line(*, batch_id: str, line: int, custom_id: str | None, code: str, message: str) -> dict:
    """One error-file line: ``error`` carries OpenAI's code and message, and the input's line number."""
    return {"id": request_line_id(batch_id, line), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message, "line": line}}


def jsonl(rows: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for row in rows)
