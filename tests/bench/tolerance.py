"""Benchmark: is `fleet.workloads.embedding.MIN_COSINE` the right tolerance? (docs/verification.md, "Comparison: the
tolerance"). Ends with one JSON line.

**Honest results.** The same texts are embedded in every way an honest car may differ that this machine can
show, per precision:

* ``int8``: onnxruntime intra-op threads 1 and 2 x every graph optimisation level (``disable``, ``basic``,
  ``extended``, ``layout``, ``all`` as the agent runs it, and ``all+sln``: ``all`` with the
  SkipLayerNormFusion the agent disables, as another agent version might run it), on the agent's own model
  (``fleet.agent.models.int8_model``: the pinned file, rewritten to integer MatMuls) through the agent's own
  ``OnnxEncoder``/``Runner`` and tokenizer;
* ``fp32``: the agent's numpy encoder with numpy's OpenBLAS at 1 and 2 threads;

and, for each of those, three batchings: ``alone`` (each text a one-text unit), ``unit`` (a unit of eight texts
through ``Runner.embed``, which groups them by length) and ``padded`` (the same eight in one forward pass, all
padded to the longest, a text beyond the 256-token truncation). The texts are standard-library docstring
paragraphs (``marketplace.corpus``), drawn in eight length bands from 1 word to beyond 256 tokens, one text
of each band per unit. Every pair of honest results of one text is compared (per-row cosine, float64 as
``fleet.workloads.embedding.row_cosines`` computes it); ``honest_min_cosine_<precision>`` is the smallest.

**Dishonest results.** The agent's own cheats (``fleet.agent.client.cheat_embed``, as ``Faults`` injects them:
``random_vectors``, ``one_vector``, ``rotate_rows``, ``negate``, ``replay``, ``first_words``), plus three
more a car could send: ``first_half`` (the first half of each text's words), ``truncate_128`` (texts cut to
128 tokens, as the model's shipped tokenizer.json does unless told otherwise: a car that skips the 256-token
setting) and ``other_precision`` (the other precision's honest result, judged at the job's precision, as the
platform does). Cheats that compute are computed with the agent's default configuration. Each dishonest
result is judged with the real ``fleet.verification.results_agree`` against *every* honest result of the same
texts (all configurations and batchings); it **passes** if it agrees with any of them, and its figure is the
best (largest), over the honest results, of its smallest row cosine. Two views:

* ``rows``: every text a result of its own (one row). This is the sharp view: a result passes iff each of its
  rows would, so the largest cosine here bounds every unit. ``replay`` sends the honest row of the most similar
  *other* text of the sample (the best a replaying car could pick).
* ``units``: the units of eight as the agent computes them (``replay``: the previous unit's rows, as the agent
  replays its last unit).

A dishonest row whose model input is the honest one (``first_words`` of a text of at most four words,
``first_half`` of a text whose first half still fills the 256 tokens, ``one_vector``/``rotate_rows`` of a
one-row result) *is* the honest result: no comparison can tell it, it is counted in ``excluded`` and left out
of the figures (a unit is excluded when every row is, or when the agent's ``cheat_applies`` says the cheat
cannot change it). Per kind the JSON gives ``results``, ``excluded``, ``pass_share`` (of the results left;
when any passed, also ``pass_share_vs_agent_default``: against the agent's default configuration only, what
the platform and replicas compute), ``max_min_cosine`` and ``margin`` (MIN_COSINE minus it: positive is
caught), ``closest`` (the token counts, before truncation, of the texts of the result that came closest) and
up to three ``passes`` (the same, for results that passed) if any passed.

``prefix_share_of_tokens``: each text of more than 64 visible tokens embedded from only the first 50, 75, 90,
95 % of them (what a car saves by computing less than the whole text); ``smallest_prefix_share_passing_...``
is the smallest of those shares at which any text passed (None: none did). Not among the "closest" figures.

``replay_corpus_short``: every docstring paragraph of at most eight words in the corpus (not just the sample)
against its most similar other one (reference configuration): whether replaying a *different* short text can
pass (``closest``, ``passes``: the two texts).

``closest_cheat_<precision>`` is the kind that comes closest in the rows view; ``closest_cheaper_cheat_...``
leaves out ``other_precision`` at ``int8``: an fp32 result sent for an int8 job costs the car more than the
honest one, and is closer to the fp32 truth, so it is reported but is no saving. ``passing_cheats_...`` lists
every kind of which any result passed, in either view.

Run: ``.venv/bin/python -m tests.bench.tolerance [--units N]`` (default 6 units of 8 texts, 48 texts; about
3-4 minutes on 2 shared cores, mostly the fp32 and padded forward passes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from itertools import combinations

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from fleet.agent import models
from fleet.agent.client import (
    FIRST_WORDS,
    cheat_applies,
    cheat_embed,
    encode_embeddings,
    first_words,
    random_unit_vectors,
)
from fleet.verification import results_agree
from fleet.workloads.embedding import MIN_COSINE, row_cosines

SLUG = models.MODEL_SLUG
SPEC = models.MODELS[SLUG]
PRECISIONS = ("int8", "fp32")
#: Length bands (inclusive), one text of each per unit: by words for the shortest, then by tokens before
#: truncation ([CLS] and [SEP] included); the last is beyond the model's 256-token truncation.
BANDS: tuple[tuple[str, Callable[[int, int], bool]], ...] = (
    ("1_word", lambda words, tokens: words == 1),
    ("2-4_words", lambda words, tokens: 2 <= words <= FIRST_WORDS),
    ("5-8_words", lambda words, tokens: FIRST_WORDS < words <= 8),
    ("9w-32_tokens", lambda words, tokens: words > 8 and tokens <= 32),
    ("33-64_tokens", lambda words, tokens: 33 <= tokens <= 64),
    ("65-128_tokens", lambda words, tokens: 65 <= tokens <= 128),
    ("129-256_tokens", lambda words, tokens: 129 <= tokens <= SPEC.max_tokens),
    (">256_tokens", lambda words, tokens: tokens > SPEC.max_tokens),
)
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "layout": ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "all+sln": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # without disabling SkipLayerNormFusion
}
BATCHINGS = ("alone", "unit", "padded")
#: The configuration the dishonest results are computed with: the agent's default.
REFERENCE = {"int8": "t1/all", "fp32": "t1"}
RANDOM_DRAWS = 20
#: The truncate_128 cheat: texts cut to 128 tokens, as the model's shipped tokenizer.json does unless told not to.
TRUNCATE_CHEAT = 128
#: Shares of a text's (visible) tokens the prefix sweep embeds.
PREFIX_SHARES = (0.5, 0.75, 0.9, 0.95)
MAX_EXAMPLES = 3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- texts


def first_half(text: str) -> str:
    """The first half of a text's words (at least one)."""
    words = text.split()
    return " ".join(words[: max(1, len(words) // 2)])


def untruncated_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(models._fp32_model_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def sample_units(units: int, seed: int = 11) -> tuple[list[list[str]], list[str], list[str]]:
    """``units`` units of eight docstring paragraphs, one of each band (in a shuffled order per unit), the
    bands' names in the flattened order, and the corpus's short paragraphs (at most 8 words)."""
    from marketplace.corpus import paragraphs

    pool = list(paragraphs(min_chars=1, max_chars=10**6))
    full = untruncated_tokenizer()
    tokens = [len(encoding.ids) for encoding in full.encode_batch(pool)]
    rng = random.Random(seed)
    by_band = []
    for name, fits in BANDS:
        members = [text for text, n in zip(pool, tokens) if fits(len(text.split()), n)]
        if len(members) < units:
            raise SystemExit(f"band {name}: only {len(members)} paragraphs, {units} units asked")
        by_band.append(rng.sample(members, units))
    result, bands = [], []
    for index in range(units):
        order = list(range(len(BANDS)))
        rng.shuffle(order)
        result.append([by_band[band][index] for band in order])
        bands += [BANDS[band][0] for band in order]
    short = [text for text in pool if len(text.split()) <= 8]
    return result, bands, short


# --------------------------------------------------------------------------- honest configurations


def embed_ids(encoder: models.Encoder, rows: list[list[int]]) -> np.ndarray:
    """``Runner.embed``'s forward pass and pooling of token ids, in a single batch padded to the longest."""
    width = max(len(ids) for ids in rows)
    input_ids = np.zeros((len(rows), width), dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    hidden = encoder(input_ids, attention_mask, np.zeros_like(input_ids))
    return models._mean_pool_normalize(hidden, attention_mask)


def one_pass(tokenizer: Tokenizer, encoder: models.Encoder, texts: list[str]) -> np.ndarray:
    """``Runner.embed`` in a single forward pass: every text padded to the longest."""
    return embed_ids(encoder, [encoding.ids for encoding in tokenizer.encode_batch(texts)])


def prefix(ids: list[int], content_tokens: int) -> list[int]:
    """The model input of a text cut to its first ``content_tokens`` tokens ([CLS] ... [SEP]), as a tokenizer
    truncating to ``content_tokens + 2`` gives it."""
    return ids if len(ids) <= content_tokens + 2 else [*ids[: content_tokens + 1], ids[-1]]


def int8_encoder(model: bytes, threads: int, level: str) -> models.Encoder:
    options = models.session_options(threads)
    options.graph_optimization_level = OPT_LEVELS[level]
    if level == "all+sln":
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        encoder = models.OnnxEncoder.__new__(models.OnnxEncoder)
        encoder.session = session
        return encoder
    return models.OnnxEncoder(model, options)


def configurations(precision: str):
    """(name, runner, before) per configuration: ``before()`` sets process state (BLAS threads) before use."""
    tokenizer = models._tokenizer(SLUG)
    if precision == "int8":
        model = models.int8_model()
        for threads in (1, 2):
            for level in OPT_LEVELS:
                runner = models.Runner(SPEC, precision, tokenizer, int8_encoder(model, threads, level))
                yield f"t{threads}/{level}", runner, lambda: None
    else:
        encoder = models.NumpyBertEncoder.from_pretrained(models._fp32_model_dir())
        for threads in (1, 2):
            if not models.limit_blas_threads(threads):
                raise SystemExit("cannot set numpy's OpenBLAS threads here")
            yield f"t{threads}", models.Runner(SPEC, precision, tokenizer, encoder), (
                lambda threads=threads: models.limit_blas_threads(threads))


def honest_results(precision: str, units: list[list[str]]) -> tuple[dict[str, np.ndarray], dict]:
    """Every honest embedding of every text: ``{"<config>/<batching>": float32 [texts, dims]}`` (rows in
    the flattened units' order), and the reference runner (the agent's default) kept for the cheats."""
    tokenizer = models._tokenizer(SLUG)
    results: dict[str, np.ndarray] = {}
    kept = {}
    for name, runner, before in configurations(precision):
        started = time.perf_counter()
        before()
        runner.embed(units[0][:2])  # warm up
        alone = np.concatenate([runner.embed([text]) for unit in units for text in unit])
        unit = np.concatenate([runner.embed(unit) for unit in units])
        padded = np.concatenate([one_pass(tokenizer, runner._encoder, unit) for unit in units])
        for batching, rows in zip(BATCHINGS, (alone, unit, padded)):
            results[f"{name}/{batching}"] = rows
        if name == REFERENCE[precision]:
            kept = {"runner": runner, "before": before}
        log(f"{precision} {name}: {time.perf_counter() - started:.1f} s")
    kept["before"]()
    return results, kept


# --------------------------------------------------------------------------- comparisons


def unit_vectors(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def honest_figures(precision: str, results: dict[str, np.ndarray], units: list[list[str]], bands: list[str],
                   tokens: list[int]) -> dict:
    names = list(results)
    stacked = unit_vectors(np.stack([results[name] for name in names]))  # [configs, texts, dims]
    pairs = list(combinations(range(len(names)), 2))
    cosines = np.stack([np.einsum("ij,ij->i", stacked[a], stacked[b]) for a, b in pairs])  # [pairs, texts]

    def factor(a: str, b: str) -> str:
        pa, pb = a.split("/"), b.split("/")
        labels = ("threads", "opt_level", "batching") if len(pa) == 3 else ("threads", "batching")
        differ = [label for label, x, y in zip(labels, pa, pb) if x != y]
        return differ[0] if len(differ) == 1 else "combined"

    by_factor: dict[str, float] = {}
    by_levels: dict[str, float] = {}  # int8: the smallest cosine per pair of optimisation levels, any threads
    for (a, b), row in zip(pairs, cosines):
        key = factor(names[a], names[b])
        by_factor[key] = min(by_factor.get(key, 1.0), float(row.min()))
        if precision == "int8":
            levels = "~".join(sorted({names[a].split("/")[1], names[b].split("/")[1]}, key=list(OPT_LEVELS).index))
            by_levels[levels] = min(by_levels.get(levels, 1.0), float(row.min()))
    pair, text = np.unravel_index(np.argmin(cosines), cosines.shape)
    by_band = {band: float(cosines[:, [i for i, b in enumerate(bands) if b == band]].min()) for band, _ in BANDS}
    # The verdict the platform would give each pair of honest results, unit by unit, with the real rule.
    sizes = np.cumsum([0] + [len(unit) for unit in units])
    encoded = {name: [encode_embeddings(results[name][sizes[u]:sizes[u + 1]]) for u in range(len(units))]
               for name in names}
    disagreements = sum(not results_agree(encoded[names[a]][u], encoded[names[b]][u], precision=precision)
                        for a, b in pairs for u in range(len(units)))
    identical = float(np.mean(cosines == 1.0)) if cosines.size else 1.0
    flat = cosines.ravel()
    minimum = float(flat.min())
    return {
        f"honest_min_cosine_{precision}": round(minimum, 9),
        f"honest_margin_{precision}": round(minimum - MIN_COSINE[precision], 9),
        f"honest_p0.1_cosine_{precision}": round(float(np.quantile(flat, 0.001)), 9),
        f"honest_p1_cosine_{precision}": round(float(np.quantile(flat, 0.01)), 9),
        f"honest_median_cosine_{precision}": round(float(np.median(flat)), 9),
        f"honest_max_deviation_{precision}": float(f"{1 - minimum:.3g}"),  # 1 - the smallest cosine
        f"honest_{precision}": {
            "configurations": len(names),
            "texts": int(stacked.shape[1]),
            "row_pairs": int(flat.size),
            "share_bit_identical_cosine_1": round(identical, 4),
            "unit_pairs_disagreeing": int(disagreements),
            "unit_pairs": len(pairs) * len(units),
            "min_by_factor": {key: round(value, 9) for key, value in sorted(by_factor.items())},
            "min_by_opt_levels": {key: round(value, 7) for key, value in sorted(by_levels.items())},
            "min_by_band": {key: round(value, 9) for key, value in by_band.items()},
            "worst_pair": {"a": names[pairs[pair][0]], "b": names[pairs[pair][1]], "band": bands[text],
                           "tokens": tokens[text], "cosine": round(minimum, 7)},
        },
    }


class Judge:
    """Judges dishonest results of one precision against every honest result of the same texts, with the real
    ``results_agree``."""

    def __init__(self, precision: str, results: dict[str, np.ndarray]):
        self.precision = precision
        self.honest = list(results.items())

    def __call__(self, rows: np.ndarray, indices: list[int]) -> tuple[bool, float, bool]:
        """Whether the result agrees with any honest result, its best smallest row cosine, and whether it agrees
        with an honest result of the agent's default configuration (what the platform and replicas compute)."""
        claim = encode_embeddings(rows)
        passed, best, passed_default = False, -1.0, False
        for name, honest in self.honest:
            truth = encode_embeddings(honest[indices])
            agrees = results_agree(claim, truth, precision=self.precision)
            passed = passed or agrees
            passed_default = passed_default or (agrees and name.startswith(REFERENCE[self.precision] + "/"))
            best = max(best, float(row_cosines(claim, truth).min()))
        return passed, best, passed_default


def summarise(precision: str, verdicts: list[tuple[bool, float, list, bool]], excluded: int) -> dict:
    """Verdicts: (passed, best smallest row cosine, what identifies the result, passed against the agent's
    default configuration)."""
    figure: dict = {"results": len(verdicts), "excluded": excluded}
    if verdicts:
        best = max(cosine for _, cosine, _, _ in verdicts)
        figure |= {
            "pass_share": round(sum(v[0] for v in verdicts) / len(verdicts), 4),
            "max_min_cosine": round(best, 6),
            "margin": round(MIN_COSINE[precision] - best, 6),
        }
        figure["closest"] = max(verdicts, key=lambda v: v[1])[2]
        passes = [v[2] for v in sorted(verdicts, key=lambda v: -v[1]) if v[0]]
        if passes:
            figure["pass_share_vs_agent_default"] = round(sum(v[3] for v in verdicts) / len(verdicts), 4)
            figure["passes"] = passes[:MAX_EXAMPLES]
    return figure


def dishonest_figures(precision: str, results: dict[str, np.ndarray], other: dict[str, np.ndarray],
                      reference: models.Runner, units: list[list[str]], tokens: list[int],
                      short: list[str], seed: int = 7) -> dict:
    """Per cheat kind, the ``rows`` and ``units`` views (see the module's docstring)."""
    judge = Judge(precision, results)
    tokenizer = models._tokenizer(SLUG)
    rng = np.random.default_rng(seed)
    texts = [text for unit in units for text in unit]
    visible_ids = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
    reference_rows = results[f"{REFERENCE[precision]}/alone"]
    other_rows = other[f"{REFERENCE['fp32' if precision == 'int8' else 'int8']}/alone"]
    other_units = other[f"{REFERENCE['fp32' if precision == 'int8' else 'int8']}/unit"]
    unit_rows = results[f"{REFERENCE[precision]}/unit"]
    sizes = np.cumsum([0] + [len(unit) for unit in units])

    def same_input(a: str, b: str) -> bool:
        return tokenizer.encode(a).ids == tokenizer.encode(b).ids

    def changed(kind: str, text: str) -> str:
        return first_words(text) if kind == "first_words" else first_half(text)

    figures: dict[str, dict] = {}
    for view in ("rows", "units"):
        groups = [[i] for i in range(len(texts))] if view == "rows" else [
            list(range(sizes[u], sizes[u + 1])) for u in range(len(units))]
        for kind in ("random_vectors", "one_vector", "rotate_rows", "negate", "replay", "first_words",
                     "first_half", "truncate_128", "other_precision"):
            verdicts, excluded = [], 0
            for number, group in enumerate(groups):
                group_texts = [texts[i] for i in group]
                group_tokens = [tokens[i] for i in group]
                embed = reference.embed
                if kind == "random_vectors":
                    claims = [random_unit_vectors(len(group), SPEC.dims, rng) for _ in range(RANDOM_DRAWS)]
                elif kind in ("one_vector", "rotate_rows", "negate"):
                    if not cheat_applies(kind, group_texts):
                        excluded += 1
                        continue
                    claims = [cheat_embed(kind, group_texts, embed=embed, dims=SPEC.dims)[0]]
                elif kind == "replay":
                    if view == "rows":  # the most similar other text of the sample
                        similar = unit_vectors(reference_rows) @ unit_vectors(reference_rows[group[0]])
                        similar[group[0]] = -2
                        earlier = reference_rows[[int(np.argmax(similar))]]
                    else:  # the previous unit, as the agent replays its last one
                        u = (number - 1) % len(units)
                        earlier = unit_rows[sizes[u]:sizes[u + 1]]
                    claims = [cheat_embed("replay", group_texts, embed=embed, dims=SPEC.dims, earlier=earlier)[0]]
                elif kind in ("first_words", "first_half"):
                    if all(same_input(changed(kind, text), text) for text in group_texts):
                        excluded += 1
                        continue
                    if kind == "first_words":
                        claims = [cheat_embed(kind, group_texts, embed=embed, dims=SPEC.dims)[0]]
                    else:
                        claims = [embed([first_half(text) for text in group_texts])]
                elif kind == "truncate_128":  # the shipped tokenizer.json's own truncation, 128 tokens
                    visible = [visible_ids[i] for i in group]
                    if all(len(ids) <= TRUNCATE_CHEAT for ids in visible):
                        excluded += 1
                        continue
                    claims = [np.concatenate([embed_ids(reference._encoder, [prefix(ids, TRUNCATE_CHEAT - 2)])
                                              for ids in visible])]
                else:  # other_precision
                    claims = [other_rows[group] if view == "rows" else other_units[group]]
                for claim in claims:
                    passed, best, passed_default = judge(claim, group)
                    verdicts.append((passed, best, group_tokens, passed_default))
            figures.setdefault(kind, {})[view] = summarise(precision, verdicts, excluded)

    # Embedding only a share of each text's visible tokens (texts of more than 64 of them), one row each.
    sweep = {}
    for share in PREFIX_SHARES:
        verdicts = []
        for i, ids in enumerate(visible_ids):
            content = len(ids) - 2
            if content > 62:
                claim = embed_ids(reference._encoder, [prefix(ids, math.ceil(share * content))])
                passed, best, passed_default = judge(claim, [i])
                verdicts.append((passed, best, [tokens[i]], passed_default))
        sweep[f"{share:g}"] = summarise(precision, verdicts, 0)
    figures["prefix_share_of_tokens"] = {"rows": sweep}

    # Replaying another short paragraph of the whole corpus (reference configuration, each text alone).
    vectors = unit_vectors(np.concatenate([reference.embed([text]) for text in short]))
    similar = vectors @ vectors.T
    np.fill_diagonal(similar, -2)
    full_ids = [tuple(tokenizer.encode(text).ids) for text in short]
    verdicts, excluded = [], 0
    for i in range(len(short)):
        j = int(np.argmax(similar[i]))
        if full_ids[i] == full_ids[j]:  # another paragraph the model reads the same: indistinguishable
            excluded += 1
            continue
        passed = results_agree(encode_embeddings(vectors[[j]]), encode_embeddings(vectors[[i]]), precision=precision)
        verdicts.append((passed, float(similar[i, j]), [short[i], short[j]], passed))
    figures["replay_corpus_short"] = {"rows": summarise(precision, verdicts, excluded)}
    return figures


def closest(precision: str, figures: dict) -> dict:
    """The closest cheat of the sharp (rows) view, over the kinds that change the result; and the closest that
    saves the car work (at int8, sending the fp32 result costs more than the honest int8 one)."""
    best = max(((figure["rows"]["max_min_cosine"], kind) for kind, figure in figures.items()
                if "max_min_cosine" in figure["rows"]), default=(None, None))
    cheaper = max(((figure["rows"]["max_min_cosine"], kind) for kind, figure in figures.items()
                   if "max_min_cosine" in figure["rows"] and not (precision == "int8" and kind == "other_precision")),
                  default=(None, None))
    passing = sorted({kind for kind, figure in figures.items() for view in figure.values()
                      if view.get("pass_share", 0) > 0})
    return {
        f"closest_cheat_{precision}": best[1],
        f"closest_cheat_cosine_{precision}": best[0],
        f"closest_cheat_margin_{precision}": None if best[0] is None else round(MIN_COSINE[precision] - best[0], 6),
        f"closest_cheaper_cheat_{precision}": cheaper[1],
        f"closest_cheaper_cheat_cosine_{precision}": cheaper[0],
        f"closest_cheaper_cheat_margin_{precision}": None if cheaper[0] is None else round(
            MIN_COSINE[precision] - cheaper[0], 6),
        f"passing_cheats_{precision}": passing,
    }


def main(units_count: int = 6) -> dict:
    started = time.perf_counter()
    units, bands, short = sample_units(units_count)
    texts = [text for unit in units for text in unit]
    tokens = [len(e.ids) for e in untruncated_tokenizer().encode_batch(texts)]
    log(f"{len(texts)} texts in {len(units)} units; {len(short)} short corpus paragraphs")
    figures: dict = {
        "bench": "tolerance",
        "texts": len(texts),
        "units": len(units),
        "tokens_before_truncation": {"min": min(tokens), "max": max(tokens)},
        "cpu": platform.processor() or platform.machine(),
        "avx512_vnni": "avx512_vnni" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "min_cosine_int8": MIN_COSINE["int8"],
        "min_cosine_fp32": MIN_COSINE["fp32"],
    }
    honest, reference = {}, {}
    for precision in PRECISIONS:
        honest[precision], reference[precision] = honest_results(precision, units)
        figures |= honest_figures(precision, honest[precision], units, bands, tokens)
    for precision in PRECISIONS:
        other = honest["fp32" if precision == "int8" else "int8"]
        reference[precision]["before"]()
        cheats = dishonest_figures(precision, honest[precision], other, reference[precision]["runner"], units,
                                   tokens, short)
        figures |= closest(precision, cheats)
        passing_shares = [float(share) for share, figure in cheats["prefix_share_of_tokens"]["rows"].items()
                          if figure.get("pass_share", 0) > 0]
        figures[f"smallest_prefix_share_passing_{precision}"] = min(passing_shares, default=None)
        figures[f"dishonest_{precision}"] = cheats
        log(f"{precision} cheats done at {time.perf_counter() - started:.0f} s")
    for precision in PRECISIONS:
        figures[f"honest_caught_{precision}"] = figures[f"honest_min_cosine_{precision}"] < MIN_COSINE[precision]
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=6, help="units of eight texts (one per length band)")
    arguments = parser.parse_args()
    print(json.dumps(main(arguments.units)))
