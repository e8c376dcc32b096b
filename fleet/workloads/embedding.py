"""Embeddings: each document becomes one unit-length vector (sentence-transformers' all-MiniLM-L6-v2, computed by
the agent's runtime, fleet.agent.models). Priced per million input tokens. The car's runtime:
fleet.agent.workloads.embedding."""

import base64
import binascii
import math

import numpy as np

from fleet.agent.models import MODELS, count_tokens
from fleet.workloads.base import BadInput, CatalogueEntry, ModelInfo, Workload

#: The smallest cosine, row by row, at which two results of one unit at one precision agree. Measured
#: (tests/bench/tolerance.py; the figures and what still passes are in docs/verification.md): honest int8
#: runs agree to 0.9975 at worst (onnxruntime's graph optimisation levels), honest fp32 runs to 1 - 5e-13; the
#: closest cheats that save work (a text's first half, a near-identical paragraph replayed) reach 0.984-0.988 at
#: int8 and 0.9983 at fp32 (the int8 result sent for an fp32 job).
MIN_COSINE = {"int8": 0.99, "fp32": 0.9999}
#: OpenAI's limit on the inputs of one embeddings request.
MAX_INPUTS_PER_REQUEST = 2048

_MINILM = MODELS["all-minilm-l6-v2"]


def decode_rows(rows_b64: list[str]) -> np.ndarray:
    """A result's rows (base64 little-endian float32, checked for shape already) as a float64 matrix."""
    return np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows_b64]).astype(np.float64)


def row_cosines(a_b64: list[str], b_b64: list[str]) -> np.ndarray:
    """Cosine of each row of one result with the same row of another (rows of unequal count: -1 each)."""
    if len(a_b64) != len(b_b64) or not a_b64:
        return np.full(max(len(a_b64), len(b_b64), 1), -1.0)
    try:
        a, b = decode_rows(a_b64), decode_rows(b_b64)
    except (binascii.Error, ValueError, TypeError):
        return np.full(len(a_b64), -1.0)
    if a.shape != b.shape:
        return np.full(len(a_b64), -1.0)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12)


def vector_problem(item, dims: int, what: str) -> str | None:
    """Why ``item`` is not one unit-length vector of ``dims`` finite float32 values in base64, or None."""
    try:
        vector = np.frombuffer(base64.b64decode(item, validate=True), dtype="<f4")
    except (binascii.Error, ValueError, TypeError):
        return f"{what} is not base64 float32"
    if vector.shape != (dims,) or not np.all(np.isfinite(vector)):
        return f"{what} must be {dims} finite float32 values"
    if not math.isclose(float(np.linalg.norm(vector)), 1.0, abs_tol=0.02):
        return f"{what} is not normalised"
    return None


def vectors_problem(result, *, docs: int, dims: int) -> str | None:
    """Why ``result`` is not one unit-length, finite vector of ``dims`` per document, or None."""
    if not isinstance(result, list) or len(result) != docs:
        return f"expected {docs} embeddings, got {len(result) if isinstance(result, list) else 'none'}"
    for i, item in enumerate(result):
        if problem := vector_problem(item, dims, f"embedding {i}"):
            return problem
    return None


class Embedding(Workload):
    task = "embedding"
    title = "Embeddings"
    consent = "turning text into vectors for search and recommendations"
    batch_url = "/v1/embeddings"
    order = 10
    catalogue = (CatalogueEntry(
        slug="all-minilm-l6-v2", name=_MINILM.name, runtime=_MINILM.slug, precisions=_MINILM.precisions,
        dims=_MINILM.dims, max_tokens=_MINILM.max_tokens, ops_per_unit=_MINILM.ops_per_token, licence="Apache-2.0",
        size_bytes=23_000_000,
        description=f"Sentence embeddings: {_MINILM.dims} dimensions, documents of up to {_MINILM.max_tokens} "
                    "tokens (longer ones are truncated)."),)

    def costs(self, model: ModelInfo, docs: list[dict]) -> list[int]:
        return count_tokens(model.runtime, [doc["text"] for doc in docs])

    def result_problem(self, model: ModelInfo, params: dict, docs: int, result: list) -> str | None:
        return vectors_problem(result, docs=docs, dims=model.dims)

    def results_agree(self, a: list, b: list, *, precision: str, params: dict) -> bool:
        """Row by row, each on its own: one wrong row makes the result wrong."""
        return bool(np.all(row_cosines(a, b) >= MIN_COSINE[precision]))

    def result_row(self, item, params: dict) -> dict:
        return {"embedding": [round(v, 7) for v in np.frombuffer(base64.b64decode(item), dtype="<f4").tolist()]}

    def batch_request(self, body: dict, model: ModelInfo) -> tuple[list[str], dict, dict]:
        """``input``: a string, or a list of strings, each one document of its own; ``encoding_format`` float or
        base64; ``dimensions`` only the model's own."""
        value = body.get("input")
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
            texts = value
        elif isinstance(value, list) and value and all(isinstance(t, (int, list)) for t in value):
            raise BadInput("Token arrays are not supported: send the input as text.", param="body.input")
        else:
            raise BadInput('"input" must be a non-empty string or a non-empty list of strings.', param="body.input")
        if len(texts) > MAX_INPUTS_PER_REQUEST:
            raise BadInput(f"At most {MAX_INPUTS_PER_REQUEST} inputs per request.", param="body.input")
        if any(not t.strip() for t in texts):
            raise BadInput("An input is empty.", param="body.input")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadInput('"encoding_format" must be "float" or "base64".', code="invalid_encoding_format",
                           param="body.encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != model.dims:
            raise BadInput(f"{model.slug} returns {model.dims} dimensions; dimensions={dimensions!r} is not "
                           "supported.", code="unsupported_dimensions", param="body.dimensions")
        return texts, {}, {"encoding_format": encoding}

    def batch_response(self, items: list, *, options: dict, params: dict, model: str, usage: int) -> dict:
        """OpenAI's embeddings response; ``base64`` is the cars' little-endian float32 as it is."""
        data = []
        for index, encoded in enumerate(items):
            embedding = (encoded if options.get("encoding_format") == "base64"
                         else np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist())
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": usage, "total_tokens": usage}}


WORKLOAD = Embedding()
