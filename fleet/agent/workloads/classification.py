"""Classification on the car (the server side and the rules: fleet.workloads.classification): the documents'
embeddings scored against the labels' vectors (zero-shot: the labels' texts are embedded with the documents,
in one call) or through the buyer's linear head; each document's label is its highest score's."""

import numpy as np

from fleet.workloads.classification import head_arrays, label_texts, scores_of

TASK = "classification"
#: Scores are sent rounded to this many decimals (far finer than the verification tolerance).
DECIMALS = 6


def run(texts: list[str], params: dict, embed) -> list:
    labels = params["labels"]
    if "head" in params:
        vectors = embed(texts)
        scores = scores_of(vectors, None, head_arrays(params["head"], len(labels), vectors.shape[1]))
    else:
        groups = [label_texts(label) for label in labels]
        flat = [text for group in groups for text in group]
        rows = embed(flat + texts)
        label_vectors, start = [], 0
        for group in groups:
            mean = rows[start:start + len(group)].astype(np.float64).mean(axis=0)
            label_vectors.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
            start += len(group)
        scores = scores_of(rows[len(flat):], np.array(label_vectors), None)
    names = [label["name"] for label in labels]
    rounded = [[round(float(s), DECIMALS) for s in row] for row in scores]
    return [{"label": names[int(np.argmax(row))], "scores": row} for row in rounded]
