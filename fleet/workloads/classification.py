"""Classification: each document gets one of the buyer's labels, with a score for every label.

Two modes, both on the MiniLM encoder the cars already carry (no new weights):

- **zero-shot** (the default): the buyer names the labels, optionally with a description and a few examples
  each. A label's vector is the normalised mean of the embeddings of its texts (``name: description``, then
  each example); a document's score for a label is the cosine of its embedding with the label's vector, and
  its label the highest-scoring one (the first on a tie).
- **linear**: the buyer also sends a linear head trained on the encoder's embeddings (``head``: ``weights_b64``,
  labels x dims little-endian float32, and ``bias``, one per label); scores are the softmax of
  ``weights . embedding + bias``.

Priced per million input tokens, like embeddings: a unit also pays for embedding its labels' texts on the car
(zero-shot), since every unit is computed on its own (docs/workloads.md). The car's runtime:
fleet.agent.workloads.classification."""

import base64
import binascii
import math

import numpy as np

from fleet.agent.models import count_tokens
from fleet.workloads.base import BadInput, CatalogueEntry, ModelInfo, Workload
from fleet.workloads.embedding import WORKLOAD as EMBEDDING

MAX_LABELS = 32
MAX_LABEL_NAME = 64
MAX_LABEL_TEXT = 500
MAX_EXAMPLES = 5
#: Most labels a linear head may have: its weights travel with every unit (16 x 384 float32, 32 KB in base64).
MAX_HEAD_LABELS = 16
#: The largest difference in any score at which two results of one unit agree, by precision. Scores are
#: cosines (zero-shot) or probabilities (linear), both within [-1, 1]. Measured by tests/bench/workloads.py
#: (docs/verification.md, "Classification"): honest int8 results (12 configurations) differ by 0.016 at most,
#: honest fp32 ones by nothing measurable; the closest cheat of the agent's by 0.19 (first_words).
SCORE_TOLERANCE = {"int8": 0.05, "fp32": 0.005}


def label_texts(label: dict) -> list[str]:
    """The texts whose embeddings make a label's vector (zero-shot)."""
    first = f"{label['name']}: {label['description']}" if label.get("description") else label["name"]
    return [first, *label.get("examples", [])]


def _label_clean(value, index: int) -> dict:
    where = f"labels[{index}]"
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise BadInput("Each label must be a name or an object with a name.", param=where)
    name = value.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_LABEL_NAME:
        raise BadInput(f"A label's name must be a non-empty string of at most {MAX_LABEL_NAME} characters.",
                       param=f"{where}.name")
    label = {"name": name.strip()}
    description = value.get("description")
    if description is not None:
        if not isinstance(description, str) or len(description) > MAX_LABEL_TEXT:
            raise BadInput(f"A description must be a string of at most {MAX_LABEL_TEXT} characters.",
                           param=f"{where}.description")
        if description.strip():
            label["description"] = description.strip()
    examples = value.get("examples")
    if examples is not None:
        if (not isinstance(examples, list) or len(examples) > MAX_EXAMPLES
                or not all(isinstance(e, str) and e.strip() and len(e) <= MAX_LABEL_TEXT for e in examples)):
            raise BadInput(f"examples must be a list of at most {MAX_EXAMPLES} non-empty strings of at most "
                           f"{MAX_LABEL_TEXT} characters.", param=f"{where}.examples")
        if examples:
            label["examples"] = [e.strip() for e in examples]
    unknown = set(value) - {"name", "description", "examples"}
    if unknown:
        raise BadInput(f"Unknown field(s) {', '.join(sorted(unknown))} in a label.", param=where)
    return label


def head_arrays(head: dict, labels: int, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """A linear head's weights (labels x dims) and bias as float32 arrays (checked by params_clean)."""
    weights = np.frombuffer(base64.b64decode(head["weights_b64"]), dtype="<f4").reshape(labels, dims)
    return weights, np.asarray(head["bias"], dtype=np.float32)


def scores_of(vectors: np.ndarray, label_vectors: np.ndarray | None, head: tuple | None) -> np.ndarray:
    """Each document's scores (rows) for each label (columns): what the car computes and the platform's
    reference too (fleet.agent.workloads.classification)."""
    if head is not None:
        weights, bias = head
        logits = vectors.astype(np.float64) @ weights.T.astype(np.float64) + bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)
    return vectors.astype(np.float64) @ label_vectors.T.astype(np.float64)


class Classification(Workload):
    task = "classification"
    title = "Classification"
    consent = "sorting texts into labels, such as spam or not spam"
    batch_url = "/v1/classifications"
    order = 20
    demo_params = {"labels": [
        {"name": "files", "description": "files, paths, directories and reading or writing them"},
        {"name": "network", "description": "sockets, HTTP, URLs, servers and clients"},
        {"name": "text", "description": "strings, characters, encodings and formatting"},
        {"name": "numbers", "description": "arithmetic, math functions, decimals and fractions"},
        {"name": "time", "description": "dates, times, clocks and time zones"},
        {"name": "errors", "description": "exceptions, warnings and error handling"},
        {"name": "concurrency", "description": "threads, processes, locks and queues"},
        {"name": "collections", "description": "lists, dictionaries, sets and other containers"}]}
    catalogue = (CatalogueEntry(
        slug="minilm-l6-classifier", name="MiniLM-L6 classifier (zero-shot or your linear head)",
        runtime=EMBEDDING.catalogue[0].runtime, precisions=EMBEDDING.catalogue[0].precisions,
        dims=EMBEDDING.catalogue[0].dims, max_tokens=EMBEDDING.catalogue[0].max_tokens,
        ops_per_unit=EMBEDDING.catalogue[0].ops_per_unit, licence="Apache-2.0",
        size_bytes=EMBEDDING.catalogue[0].size_bytes,
        description="Sorts documents into your labels: zero-shot from the labels' names, descriptions and "
                    "examples, or with a linear head you trained on all-MiniLM-L6-v2 embeddings. Every "
                    "document gets its label and a score per label."),)

    def params_clean(self, params, model: ModelInfo) -> dict:
        """``{"labels": [name | {name, description?, examples?}, ...], "head"?: {weights_b64, bias}}``."""
        if not isinstance(params, dict):
            raise BadInput('Classification needs "labels": a list of label names or objects.', param="labels")
        unknown = set(params) - {"labels", "head"}
        if unknown:
            raise BadInput(f"Unknown parameter(s) {', '.join(sorted(unknown))}.", param="params")
        raw = params.get("labels")
        if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_LABELS:
            raise BadInput(f'"labels" must list 2 to {MAX_LABELS} labels.', param="labels")
        labels = [_label_clean(value, i) for i, value in enumerate(raw)]
        names = [label["name"] for label in labels]
        if len(set(names)) != len(names):
            raise BadInput("Two labels have the same name.", param="labels")
        cleaned = {"labels": labels}
        head = params.get("head")
        if head is not None:
            cleaned["head"] = self._head_clean(head, labels=len(labels), dims=model.dims)
        return cleaned

    def _head_clean(self, head, *, labels: int, dims: int) -> dict:
        if not isinstance(head, dict) or set(head) != {"weights_b64", "bias"}:
            raise BadInput('"head" must be {"weights_b64": ..., "bias": [...]}.', param="head")
        if labels > MAX_HEAD_LABELS:
            raise BadInput(f"A linear head may have at most {MAX_HEAD_LABELS} labels.", param="head")
        try:
            weights = np.frombuffer(base64.b64decode(head["weights_b64"], validate=True), dtype="<f4")
        except (binascii.Error, ValueError, TypeError):
            raise BadInput("head.weights_b64 must be base64 little-endian float32.", param="head.weights_b64")
        if weights.size != labels * dims or not np.all(np.isfinite(weights)):
            raise BadInput(f"head.weights_b64 must hold {labels} x {dims} finite float32 values (one row per label, "
                           "in the labels' order).", param="head.weights_b64")
        bias = head["bias"]
        if (not isinstance(bias, list) or len(bias) != labels
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bias)):
            raise BadInput(f"head.bias must be {labels} numbers, one per label.", param="head.bias")
        return {"weights_b64": head["weights_b64"], "bias": [float(b) for b in bias]}

    def costs(self, model: ModelInfo, docs: list[dict]) -> list[int]:
        return count_tokens(model.runtime, [doc["text"] for doc in docs])

    def unit_overhead(self, model: ModelInfo, params: dict) -> int:
        if "head" in params:
            return 0
        return sum(count_tokens(model.runtime, [t for label in params["labels"] for t in label_texts(label)]))

    def result_problem(self, model: ModelInfo, params: dict, docs: int, result: list) -> str | None:
        """One ``{"label": name, "scores": [one finite number per label]}`` per document, its label the
        highest score's (the first on a tie)."""
        names = [label["name"] for label in params["labels"]]
        if not isinstance(result, list) or len(result) != docs:
            return f"expected {docs} classifications, got {len(result) if isinstance(result, list) else 'none'}"
        for i, item in enumerate(result):
            if not isinstance(item, dict) or set(item) != {"label", "scores"}:
                return f"classification {i} must be {{label, scores}}"
            scores = item["scores"]
            if (not isinstance(scores, list) or len(scores) != len(names)
                    or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                               and -1.0001 <= s <= 1.0001 for s in scores)):
                return f"classification {i} must have {len(names)} scores between -1 and 1"
            if item["label"] != names[int(np.argmax(scores))]:
                return f"classification {i}'s label is not its highest score's"
        return None

    def results_agree(self, a: list, b: list, *, precision: str, params: dict) -> bool:
        """Every score within SCORE_TOLERANCE of the other result's. A label that differs is then a near tie
        (each label is its own result's highest score, checked before): both answers are honest."""
        if len(a) != len(b) or not a:
            return False
        try:
            left = np.array([item["scores"] for item in a], dtype=np.float64)
            right = np.array([item["scores"] for item in b], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            return False
        return left.shape == right.shape and bool(np.all(np.abs(left - right) <= SCORE_TOLERANCE[precision]))

    def result_row(self, item, params: dict) -> dict:
        names = [label["name"] for label in params["labels"]]
        return {"label": item["label"], "scores": dict(zip(names, item["scores"]))}

    summary_title = "Labels so far"
    summary_columns = ("Label", "Documents")
    summary_note = "Each document's label and its score for every label are in the results download."

    def summary(self, items, params: dict) -> list[tuple[str, int]]:
        """How many documents got each label so far, in the labels' order."""
        counts = dict.fromkeys((label["name"] for label in params["labels"]), 0)
        for item in items:
            counts[item["label"]] = counts.get(item["label"], 0) + 1
        return list(counts.items())

    def batch_request(self, body: dict, model: ModelInfo) -> tuple[list[str], dict, dict]:
        """``input`` as for embeddings (a string or a list of strings), ``labels`` and ``head`` as in our job
        API: the same in every line of a batch."""
        texts, _, _ = EMBEDDING.batch_request({"input": body.get("input")}, model)
        params = {key: body[key] for key in ("labels", "head") if key in body}
        return texts, self.params_clean(params, model), {}

    def batch_response(self, items: list, *, options: dict, params: dict, model: str, usage: int) -> dict:
        data = [{"object": "classification", "index": index, **self.result_row(item, params)}
                for index, item in enumerate(items)]
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": usage, "total_tokens": usage}}


WORKLOAD = Classification()
