"""Embeddings on the car: each text's vector, as base64 little-endian float32 (the server side:
fleet.workloads.embedding)."""

import base64

import numpy as np

TASK = "embedding"


def encode_embeddings(vectors: np.ndarray) -> list[str]:
    """One base64 string of little-endian float32 values per row: the wire format of an embeddings result."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]


def run(texts: list[str], params: dict, embed) -> list:
    return encode_embeddings(embed(texts))
