"""Real English text that ships with Python: paragraphs of the standard library's docstrings. Used for the
demo job, the tests and the benchmarks, so nothing is downloaded."""

import importlib
import inspect
import warnings
from collections.abc import Iterator

MODULES = ["json", "collections", "itertools", "functools", "pathlib", "datetime", "decimal", "fractions",
           "statistics", "textwrap", "string", "re", "argparse", "logging", "asyncio", "threading", "subprocess",
           "email", "http.client", "urllib.request", "unittest", "typing", "dataclasses", "enum", "heapq",
           "bisect", "shutil", "tempfile", "zipfile", "csv", "sqlite3", "random", "os", "socket", "ssl"]


def paragraphs(*, min_chars: int = 40, max_chars: int = 1200) -> Iterator[str]:
    """Docstring paragraphs in a fixed order, without duplicates."""
    seen: set[str] = set()
    for name in MODULES:
        module = importlib.import_module(name)
        objects = [module, *(obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or inspect.isroutine(obj))]
        for obj in objects:
            with warnings.catch_warnings():  # reading some deprecated aliases' docstrings warns
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj) or ""
            for block in doc.split("\n\n"):
                text = " ".join(block.split())
                if min_chars <= len(text) <= max_chars and text not in seen and not text.startswith(">>>"):
                    seen.add(text)
                    yield text


def documents(count: int) -> list[dict]:
    """``count`` documents as job input rows; cycles through the corpus if it is asked for more."""
    corpus = list(paragraphs())
    return [{"id": f"doc-{i:06d}", "text": corpus[i % len(corpus)]} for i in range(count)]
