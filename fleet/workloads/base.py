"""What a workload module provides on the server (docs/workloads.md): pure Python, no ORM, so that the market
(marketplace), the fleet (result checks, verification) and the batch surface (marketplace.batches) all read
one definition. A workload's runtime on the car is its module in fleet.agent.workloads."""

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

from fleet.protocol import MAX_TEXT_CHARS, UNIT_TEXT_BYTES


def wire_bytes(text: str) -> int:
    """What a text takes in a unit.assign message (JSON with non-ASCII characters escaped, as fleet.protocol encodes)."""
    return len(json.dumps(text))


def fit_text(text: str) -> str:
    """A text cut to what one unit.assign can carry alone (fleet.protocol.MAX_TEXT_CHARS, UNIT_TEXT_BYTES). The
    text models read at most a few thousand characters (all-MiniLM-L6-v2: 256 tokens), so the cut changes
    nothing they compute; the document stored is the cut one."""
    text = text[:MAX_TEXT_CHARS]
    while wire_bytes(text) > UNIT_TEXT_BYTES:
        text = text[:len(text) * 4 // 5]
    return text


class BadInput(Exception):
    """A buyer's input or parameter that cannot be used: ``message`` says why in their words, ``param`` names the
    field (``labels[2].name``, ``body.input``)."""

    def __init__(self, message: str, *, code: str = "invalid_input", param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(frozen=True)
class PriceUnit:
    """How a buyer sees a workload's price: ``per`` of ``name`` (a million tokens, a thousand pages)."""

    name: str  # what is counted: "token", "page"
    per: int  # how many of them one price is for
    label: str  # "per million tokens", after the currency
    key: str  # in field names: max_price_per_<key> ("million_tokens")


#: English text under a WordPiece or BPE tokenizer, for estimates only.
CHARS_PER_TOKEN = 4

TOKENS = PriceUnit(name="token", per=1_000_000, label="per million tokens", key="million_tokens")
PAGES = PriceUnit(name="page", per=1_000, label="per thousand pages", key="thousand_pages")


@dataclass(frozen=True)
class CatalogueEntry:
    """One model buyers can run for a workload: the catalogue's data (marketplace.models.AIModel is synced from
    it after every migrate). ``runtime`` names the agent's implementation (fleet.agent.models); ``ops_per_unit``
    what one cost unit (a token, a page) takes on the car, the basis of every price."""

    slug: str
    name: str
    runtime: str
    precisions: tuple[str, ...]
    dims: int
    max_tokens: int
    ops_per_unit: int
    licence: str
    size_bytes: int
    description: str


@dataclass(frozen=True)
class ModelInfo:
    """What a workload needs to know of a catalogue model when it reads inputs (from the AIModel row)."""

    slug: str
    task: str
    runtime: str
    dims: int
    max_tokens: int

    @classmethod
    def of(cls, ai_model) -> "ModelInfo":
        """From a catalogue row (marketplace.models.AIModel), read by its attributes."""
        return cls(slug=ai_model.slug, task=ai_model.task, runtime=ai_model.runtime, dims=ai_model.dims,
                   max_tokens=ai_model.max_tokens)


class Workload:
    """A workload's server side. Subclasses set the class attributes and override what differs; a module in
    this package that defines ``WORKLOAD`` is registered (fleet.workloads)."""

    task: ClassVar[str]
    title: ClassVar[str]
    consent: ClassVar[str]  # what an owner consents to, in plain words
    price_unit: ClassVar[PriceUnit] = TOKENS
    batch_url: ClassVar[str]  # the OpenAI-compatible batch endpoint its request lines name
    order: ClassVar[int] = 100  # where it is listed
    catalogue: ClassVar[tuple[CatalogueEntry, ...]] = ()
    #: the largest job-parameters object (JSON bytes) it accepts: they travel to the car with every unit
    max_params_bytes: ClassVar[int] = 16 * 1024
    #: one input line, as the new-job page and the docs show it
    input_example: ClassVar[str] = '{"id": "a1", "text": "The invoice is due in thirty days."}'
    #: what a document may be, in a few words (the new-job page's catalogue)
    input_limits: ClassVar[str] = "texts; the model reads up to {max_tokens} tokens of each"
    #: parameters for a job of standard-library docstrings: what the demo buyer of `make run` runs
    demo_params: ClassVar[dict] = {}
    #: what the demo buyer's documents are ("text": docstring paragraphs; "page": those rendered as page images,
    #: marketplace.corpus) and how many a demo job has at most (None: the demo's own number)
    demo_input: ClassVar[str] = "text"
    demo_docs: ClassVar[int | None] = None
    #: Whether a unit's inputs travel in its unit.assign (texts), or the car fetches them by URL (page images,
    #: too large for a message: docs/vehicle-protocol.md, "Inputs by URL").
    inline_inputs: ClassVar[bool] = True
    #: The most documents a unit holds (None: the operator's DOCS_PER_UNIT), and the most bytes its inputs take
    #: when fetched by URL (inline inputs: fleet.protocol.UNIT_TEXT_BYTES).
    docs_per_unit: ClassVar[int | None] = None
    max_unit_bytes: ClassVar[int] = 8 * 1024 * 1024
    #: The longest input line accepted (None: the operator's MAX_UPLOAD_LINE_BYTES).
    max_line_bytes: ClassVar[int | None] = None
    #: Bytes a car sends back per document, about (sizes its leases to its uplink: fleet.dispatch), and, for
    #: inputs fetched by URL, bytes it fetches per document (also counted against its owner's data budget).
    result_bytes_per_doc: ClassVar[int] = 2_048
    input_bytes_per_doc: ClassVar[int] = 0

    # --- inputs -----------------------------------------------------------------------------------------
    def params_clean(self, params: Any, model: ModelInfo) -> dict:
        """The job's parameters checked and normalised (raise BadInput): the same for every document."""
        if params not in (None, {}):
            raise BadInput(f"{self.title} take no parameters.", param="params")
        return {}

    def document_clean(self, row: dict) -> dict:
        """One input row (a JSON object) as the document a unit carries (raise BadInput)."""
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadInput('"text" must be a non-empty string', param="text")
        return {"id": row.get("id"), "text": fit_text(text)}

    def input_row(self, doc_id, payload: str) -> dict:
        """The input line (as document_clean reads it) of a batch request's document (marketplace.flows.batches)."""
        return {"id": doc_id, "text": payload}

    def unit_limits(self, docs_per_unit: int) -> tuple[int, int]:
        """(documents, bytes) a unit may hold at most: ``docs_per_unit`` is the operator's DOCS_PER_UNIT."""
        return self.docs_per_unit or docs_per_unit, UNIT_TEXT_BYTES if self.inline_inputs else self.max_unit_bytes

    def payload_bytes(self, doc: dict) -> int:
        """What a document takes in its unit: in the unit.assign's JSON (inline), or fetched by URL."""
        return wire_bytes(doc["text"]) if self.inline_inputs else len(doc["text"])

    def costs(self, model: ModelInfo, docs: list[dict]) -> list[int]:
        """Each document's cost in price units (tokens, pages): what it is charged and how its work is sized."""
        raise NotImplementedError

    def estimate_costs(self, model: ModelInfo, *, docs: int, chars: int) -> int:
        """The cost units of ``docs`` documents of ``chars`` characters in all, before they are read (the new-job
        page's estimate; the job is costed exactly once its file is uploaded): for text, about CHARS_PER_TOKEN
        characters a token plus the two special tokens, each document capped at the model's context."""
        return min(chars // CHARS_PER_TOKEN + 2 * docs, docs * model.max_tokens)

    def unit_overhead(self, model: ModelInfo, params: dict) -> int:
        """Cost units a unit takes beyond its documents' (the labels a classifier embeds on each car)."""
        return 0

    def unit_params(self, params: dict) -> dict:
        """What a car needs of the job's parameters to compute a unit (sent with every unit)."""
        return params

    # --- results ----------------------------------------------------------------------------------------
    def result_problem(self, model: ModelInfo, params: dict, docs: int, result: list) -> str | None:
        """Why a car's result for a unit of ``docs`` documents cannot be accepted (its shape), or None."""
        raise NotImplementedError

    def results_agree(self, a: list, b: list, *, precision: str, params: dict) -> bool:
        """Whether two results of one unit are the same answer, within the tolerance measured for the
        workload at that precision (docs/verification.md)."""
        raise NotImplementedError

    def result_row(self, item: Any, params: dict) -> dict:
        """One document's result as our results API writes it (beside its ``index`` and ``id``)."""
        raise NotImplementedError

    #: the job page's summary: its title, its two columns' headings, and a note under it
    summary_title: ClassVar[str] = "Results so far"
    summary_columns: ClassVar[tuple[str, str]] = ("What", "How many")
    summary_note: ClassVar[str] = ""

    def summary(self, items: Iterable, params: dict) -> list[tuple[str, int]] | None:
        """What the job page shows of the results so far, as (what, how many) rows, or None: nothing to sum up."""
        return None

    def preview(self, doc: dict, item: Any) -> dict | None:
        """One document and its result as the job page shows its first few (``image``: a data URL, ``text``), or
        None: the workload has nothing to show beside the summary."""
        return None

    # --- the OpenAI-compatible batch surface (marketplace.batches) ----------------------------------------
    def batch_request(self, body: dict, model: ModelInfo) -> tuple[list[str], dict, dict]:
        """A request line's body as (its documents' texts, the job parameters it sets, how its answer is
        written); raise BadInput. Every request of one batch must set the same parameters."""
        raise NotImplementedError

    def batch_response(self, items: list, *, options: dict, params: dict, model: str, usage: int) -> dict:
        """The response body of one request line from its documents' results."""
        raise NotImplementedError

