"""Benchmark: each workload's runtime on the car against the bare runtime, and classification's tolerance
(docs/workloads.md, docs/verification.md "Classification"). Ends with one JSON line.

**Throughput** (int8, one onnxruntime thread, units of 8 standard-library docstring paragraphs, the agent's
runner): ``<workload>_per_s`` is documents per second through the agent's workload code
(fleet.agent.workloads.compute, what a car runs per unit); ``<workload>_ratio_vs_bare`` divides it by the bare
runtime's on the same documents, interleaved in this run (medians of ``--repeats``):

* embeddings: bare is the onnxruntime session on the same graph fed directly (the tokenizer's ids, mean pooling
  and normalisation in numpy), in whichever of two ways is faster in this run: the unit in one ``session.run``
  padded to its longest text, or one ``session.run`` per text (no padding). The agent's runner groups a unit's
  texts by length (fleet.agent.models.batches), which neither does;
* classification (zero-shot, 8 labels with descriptions): bare embeds the labels once for the whole run and
  each unit's documents with the same session, then scores them with one matrix product. The agent embeds a
  unit's labels with every unit (each unit is computed on its own, and paid for that: docs/workloads.md), so
  this ratio shows what that costs.

**Classification tolerance.** The same documents classified by every honest configuration the tolerance
benchmark (tests/bench/tolerance.py) knows (int8: 1 and 2 threads x every graph optimisation level; fp32: the
numpy encoder at 1 and 2 BLAS threads): ``honest_max_score_diff_<precision>`` is the largest difference of any
score between two honest results of one document, ``honest_label_disagreements_<precision>`` how many
documents got two labels (near ties). Each cheat of the agent (fleet.agent.client.cheat_embed) is run on the
reference configuration: ``cheat_min_score_diff`` is, per kind, the smallest over units of the largest score
difference to the honest result (what the comparison sees), and ``cheat_units_passing`` how many units of that
kind SCORE_TOLERANCE would let through.

**Document OCR** (fp32, the same thread count, units of 4 pages rendered from docstrings by fleet.agent.pages,
``--pages`` of them): ``ocr_per_s`` is pages per second through the agent's workload code (base64 pages in, the
readings as the car sends them out), ``ocr_ratio_vs_bare`` divides it by RapidOCR's own pipeline called on the
same page files with the same engine, interleaved (medians of ``--repeats``); ``ocr_cer_mean`` and
``ocr_cer_max`` are the readings' character error rates against the rendered text. Its tolerance: the same pages
read by a second engine on 2 threads (``ocr_honest_max_cer``: the largest error rate between two honest readings
of one page), and every cheat of the agent (fleet.agent.client.cheat_read) on each unit: ``ocr_cheat_min_cer`` per
kind is the smallest, over units, of the unit's worst page (what the comparison sees), ``ocr_cheat_units_passing``
how many units CER_TOLERANCE would let through.

Run alone: python -m tests.bench.workloads [--docs 96] [--repeats 5] [--pages 8]"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from fleet.workloads.classification import WORKLOAD as CLASSIFICATION

LABELS = CLASSIFICATION.demo_params["labels"]  # docstring topics: what the demo buyer sorts

UNIT = 8


def _documents(count: int) -> list[str]:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    django.setup()
    from marketplace.corpus import documents

    return [d["text"] for d in documents(count)]


def _units(texts: list[str]) -> list[list[str]]:
    return [texts[i:i + UNIT] for i in range(0, len(texts), UNIT)]


def throughput(texts: list[str], repeats: int) -> dict:
    from fleet.agent import models
    from fleet.agent.workloads import compute
    from fleet.workloads.classification import label_texts

    runner = models.get_runner(models.MODEL_SLUG, "int8")
    session = runner._encoder.session
    tokenizer = models._tokenizer(models.MODEL_SLUG)
    params = {"labels": LABELS}
    units = _units(texts)

    def bare_padded(batch: list[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch(batch)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, :len(encoding.ids)], mask[row, :len(encoding.ids)] = encoding.ids, 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
        pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    def bare_single(batch: list[str]) -> np.ndarray:
        return np.concatenate([bare_padded([text]) for text in batch])

    def timed(run) -> float:
        started = time.perf_counter()
        for unit in units:
            run(unit)
        return len(texts) / (time.perf_counter() - started)

    bare_padded(units[0]), compute("classification", units[0], params, runner.embed)  # warm up
    label_vectors = np.array([bare_padded(label_texts(label)).mean(axis=0) for label in LABELS])
    label_vectors /= np.linalg.norm(label_vectors, axis=1, keepdims=True)
    runs = {
        "embedding": lambda unit: compute("embedding", unit, {}, runner.embed),
        "classification": lambda unit: compute("classification", unit, params, runner.embed),
    }
    anchors = {"padded": bare_padded, "single": bare_single}
    figures = {}
    for name, agent in runs.items():
        ours, anchor = [], {way: [] for way in anchors}
        for _ in range(repeats):
            ours.append(timed(agent))
            for way, embed in anchors.items():
                anchor[way].append(timed(
                    embed if name == "embedding" else lambda unit, embed=embed: (embed(unit) @ label_vectors.T).argmax(1)))
        bare = {way: statistics.median(rates) for way, rates in anchor.items()}
        best = max(bare, key=bare.get)
        figures[f"{name}_per_s"] = round(statistics.median(ours), 1)
        figures[f"{name}_bare_per_s"] = round(bare[best], 1)
        figures[f"{name}_bare_way"] = best
        figures[f"{name}_ratio_vs_bare"] = round(statistics.median(ours) / bare[best], 3)
    return figures


def tolerance(texts: list[str]) -> dict:
    from fleet.agent.client import cheat_embed
    from fleet.agent.workloads import compute
    from fleet.workloads.classification import SCORE_TOLERANCE
    from tests.bench.tolerance import REFERENCE, configurations

    params = {"labels": LABELS}
    units = _units(texts)
    figures: dict = {}
    for precision in ("int8", "fp32"):
        results = {}
        for name, runner, before in configurations(precision):
            before()
            results[name] = [item for unit in units for item in compute("classification", unit, params, runner.embed)]
        names = list(results)
        worst, ties = 0.0, set()
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                for k, (x, y) in enumerate(zip(results[a], results[b])):
                    worst = max(worst, float(np.max(np.abs(np.subtract(x["scores"], y["scores"])))))
                    if x["label"] != y["label"]:
                        ties.add(k)
        figures[f"honest_max_score_diff_{precision}"] = round(worst, 6)
        figures[f"honest_label_disagreements_{precision}"] = len(ties)
        figures[f"configurations_{precision}"] = len(names)
        if precision == "int8":
            reference = results[REFERENCE[precision]]
            runner = next(r for n, r, _ in configurations(precision) if n == REFERENCE[precision])
            rng = np.random.default_rng(1)
            closest, passing = {}, {}
            for kind in ("random_vectors", "one_vector", "rotate_rows", "first_words"):
                diffs = []
                for u, unit in enumerate(units):
                    def embed(batch, kind=kind):
                        return cheat_embed(kind, batch, embed=runner.embed, dims=384, rng=rng)[0]
                    cheated = compute("classification", unit, params, embed)
                    truth = reference[u * UNIT:u * UNIT + len(unit)]
                    diffs.append(max(float(np.max(np.abs(np.subtract(c["scores"], t["scores"]))))
                                     for c, t in zip(cheated, truth)))
                closest[kind] = round(min(diffs), 6)
                passing[kind] = sum(d <= SCORE_TOLERANCE[precision] for d in diffs)
            figures["cheat_min_score_diff"] = closest
            figures["cheat_units_passing"] = passing
            figures["score_tolerance_int8"] = SCORE_TOLERANCE["int8"]
    figures["score_tolerance_fp32"] = SCORE_TOLERANCE["fp32"]
    return figures


OCR_UNIT = 4


def ocr(count: int, repeats: int) -> dict:
    import base64

    from rapidocr_onnxruntime import RapidOCR

    from fleet.agent import models, ocr as agent_ocr
    from fleet.agent.client import cheat_read
    from fleet.agent.pages import error_rate, render_page
    from fleet.agent.workloads import compute
    from fleet.workloads.ocr import CER_TOLERANCE, reading_error
    from marketplace.corpus import page_texts

    truths = page_texts(count)
    files = [render_page(text) for text in truths]
    images = [base64.b64encode(data).decode("ascii") for data in files]
    units = [images[i:i + OCR_UNIT] for i in range(0, len(images), OCR_UNIT)]
    runner = models.get_runner(agent_ocr.OCR_SLUG, "fp32")
    engine = agent_ocr._engine(models.ort_threads())  # the engine the agent's runner uses: the same threads

    def timed(run) -> float:
        started = time.perf_counter()
        for unit in units:
            run(unit)
        return len(images) / (time.perf_counter() - started)

    def agent(unit):
        return compute("ocr", unit, {}, runner.infer)

    def bare(unit):
        return [engine(base64.b64decode(image)) for image in unit]

    readings = [page for unit in units for page in agent(unit)]  # also the warm-up
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(timed(agent))
        theirs.append(timed(bare))
    rates = [error_rate(page["text"], truth) for page, truth in zip(readings, truths)]
    figures = {"ocr_pages": len(images), "ocr_unit": OCR_UNIT, "ocr_per_s": round(statistics.median(ours), 3),
               "ocr_bare_per_s": round(statistics.median(theirs), 3),
               "ocr_ratio_vs_bare": round(statistics.median(ours) / statistics.median(theirs), 3),
               "ocr_cer_mean": round(float(np.mean(rates)), 4), "ocr_cer_max": round(max(rates), 4)}
    two = RapidOCR(intra_op_num_threads=2, inter_op_num_threads=1)
    other = [agent_ocr.page_reading(two(data)[0]) for data in files]
    figures["ocr_honest_max_cer"] = round(max(reading_error(a["text"], b["text"]) for a, b in zip(readings, other)), 4)
    earlier = runner.read([base64.b64encode(render_page(page_texts(1, start=count)[0])).decode("ascii")])
    rng = np.random.default_rng(1)
    closest, passing = {}, {}
    for kind in ("random_vectors", "one_vector", "rotate_rows", "negate", "replay", "first_words"):
        worst = []
        for u, unit in enumerate(units):
            cheated, _ = cheat_read(kind, unit, read=runner.read, read_cheap=runner.read_scaled, rng=rng,
                                    earlier=earlier)
            truth = readings[u * OCR_UNIT:u * OCR_UNIT + len(unit)]
            worst.append(max(reading_error(c["text"], t["text"]) for c, t in zip(cheated, truth)))
        closest[kind] = round(min(worst), 4)
        passing[kind] = sum(w <= CER_TOLERANCE for w in worst)
    figures.update(ocr_cheat_min_cer=closest, ocr_cheat_units_passing=passing, ocr_cer_tolerance=CER_TOLERANCE)
    return figures


def main(docs: int = 96, repeats: int = 5, pages: int = 8) -> dict:
    texts = _documents(docs)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    result = {"bench": "workloads", "docs": len(texts), "unit": UNIT, "labels": len(LABELS), "threads": 1,
              **throughput(texts, repeats), **tolerance(texts[:48]), **ocr(pages, max(1, repeats // 2))}
    result["load_avg_1m"] = {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


if __name__ == "__main__":
    os.environ.setdefault("FLEET_ORT_THREADS", "1")
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pages", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(main(args.docs, args.repeats, args.pages)))
