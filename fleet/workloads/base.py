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


TOKENS = PriceUnit(name="token", per=1_000_000, label="per million tokens")


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
    #: parameters for a job of standard-library docstrings: what the demo buyer of `make run` runs
    demo_params: ClassVar[dict] = {}

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

    def costs(self, model: ModelInfo, docs: list[dict]) -> list[int]:
        """Each document's cost in price units (tokens, pages): what it is charged and how its work is sized."""
        raise NotImplementedError

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

    def summary(self, items: Iterable, params: dict) -> list[tuple[str, int]] | None:
        """What the job page shows of the results so far, as (what, how many) rows, or None: nothing to sum up."""
        return None

    # --- the OpenAI-compatible batch surface (marketplace.batches) ----------------------------------------
    def batch_request(self, body: dict, model: ModelInfo) -> tuple[list[str], dict, dict]:
        """A request line's body as (its documents' texts, the job parameters it sets, how its answer is
        written); raise BadInput. Every request of one batch must set the same parameters."""
        raise NotImplementedError

    def batch_response(self, items: list, *, options: dict, params: dict, model: str, usage: int) -> dict:
        """The response body of one request line from its documents' results."""
        raise NotImplementedError

