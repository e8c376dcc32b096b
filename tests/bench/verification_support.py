"""What the verification benchmark (tests.bench.verification) simulates on the cars' side: the true embeddings of
the job's texts, computed once with the reference runtime, and cars that answer with them honestly or cheat the
way the agent does (fleet.agent.client: Faults, cheat_applies, cheat_embed). No Django here."""

import random
from dataclasses import dataclass, field

import numpy as np

from fleet.agent.client import Faults, cheat_applies, cheat_embed, encode_embeddings, first_words

RUNTIME = "all-minilm-l6-v2"
PRECISION = "int8"
DIMS = 384


class Truth:
    """The true int8 embedding of each text, computed once per distinct text with the reference runtime
    (fleet.agent.models.get_runner), each text alone. An honest car answers with these: what an honest
    computation gives, without computing it again for every unit and replica."""

    def __init__(self) -> None:
        from fleet.agent.models import get_runner

        self._runner = get_runner(RUNTIME, PRECISION)
        self._rows: dict[str, np.ndarray] = {}
        self.computed = 0

    def warm(self, texts) -> None:
        for text in texts:
            self.row(text)

    def row(self, text: str) -> np.ndarray:
        row = self._rows.get(text)
        if row is None:
            row = self._rows[text] = np.asarray(self._runner.embed([text])[0], dtype=np.float32)
            self.computed += 1
        return row

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.row(text) for text in texts]) if texts else np.zeros((0, DIMS), np.float32)

    def texts_for(self, text: str) -> list[str]:
        """The texts a car may embed for ``text``: itself, and its first words (the first_words cheat)."""
        return [text, first_words(text)]


@dataclass
class Car:
    """One simulated car: how fast it works (units it takes per round), and its agent's cheats (None: honest).

    ``compute`` mirrors fleet.agent.client.Agent._cheat_for and _compute: honest until ``faults.cheat_after``
    results were sent, then one draw per result against the cheats' probabilities (Faults.draw_cheat); a cheat
    that cannot change the result is not applied (cheat_applies); ``replay`` sends the last unit this car
    computed honestly (random vectors when it has none, or when that unit is this one)."""

    pk: int
    owner_id: int
    label: str
    speed: int
    faults: Faults | None
    seed: int
    sent: int = 0  # results sent (every one was accepted: the car learns nothing)
    wrong_sent: int = 0  # results that disagree with the truth
    kinds: dict[str, int] = field(default_factory=dict)  # wrong results by cheat kind
    first_wrong_at: int | None = None  # ``sent`` after its first wrong result
    caught_at: int | None = None  # ``sent`` when its first wrong result was recorded (flows.vehicle_caught)
    wrong_before_caught: int | None = None
    suspended_seen: bool = False

    def __post_init__(self) -> None:
        self._rng = random.Random(f"cheats/{self.seed}")
        self._np_rng = np.random.default_rng(self.seed)
        self._earlier: tuple[int, np.ndarray] | None = None

    @property
    def cheater(self) -> bool:
        return self.faults is not None and self.faults.cheats

    def _cheat_for(self, unit_id: int, texts: list[str]) -> str | None:
        faults = self.faults
        if faults is None or not faults.cheats or self.sent < faults.cheat_after:
            return None
        kind = faults.draw_cheat(self._rng)
        if kind is None or not cheat_applies(kind, texts):
            return None
        if kind == "replay" and (self._earlier is None or self._earlier[0] == unit_id):
            return "random_vectors"
        return kind

    def compute(self, unit_id: int, texts: list[str], truth: Truth) -> tuple[list[str], str | None, bool]:
        """The result this car sends for a unit: (rows as base64, the cheat applied or None, whether it is wrong)."""
        kind = self._cheat_for(unit_id, texts)
        earlier = self._earlier[1] if kind == "replay" else None
        vectors, honest = cheat_embed(kind, texts, embed=truth.embed, dims=DIMS,
                                      rng=self._np_rng if kind == "random_vectors" else None, earlier=earlier)
        if honest is not None and len(honest) and self.faults is not None and self.faults.replay > 0:
            self._earlier = (unit_id, honest)
        wrong = False
        if kind is not None:
            true = truth.embed(texts)
            cos = np.einsum("ij,ij->i", vectors.astype(np.float64), true.astype(np.float64)) / np.maximum(
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(true, axis=1), 1e-12)
            from fleet.verification import MIN_COSINE

            wrong = bool(np.any(cos < MIN_COSINE[PRECISION]))
        self.sent += 1
        if wrong:
            self.wrong_sent += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            if self.first_wrong_at is None:
                self.first_wrong_at = self.sent
        return encode_embeddings(vectors), kind, wrong


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (q in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))]
