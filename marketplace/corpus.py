"""Real English text that ships with Python: paragraphs of the standard library's docstrings. Used for the
demo job, the tests and the benchmarks, so nothing is downloaded."""

import base64
import importlib
import inspect
import re
import warnings
from collections.abc import Iterator

from fleet.agent.pages import render_page

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


#: Paragraphs set on page images keep to the characters printed text mostly has (no backticks or tables, which
#: docstrings have and scanned letters rarely do).
_PLAIN = re.compile(r"^[A-Za-z0-9 ,.;:'()\-]+$")


def page_texts(count: int, *, start: int = 0) -> list[str]:
    """``count`` plain paragraphs of 150 to 700 characters from the ``start``-th (cycling), the texts of rendered
    pages (fleet.agent.pages)."""
    corpus = [text for text in paragraphs(min_chars=150, max_chars=700) if _PLAIN.match(text)]
    return [corpus[i % len(corpus)] for i in range(start, start + count)]


def page_documents(count: int, *, start: int = 0) -> list[dict]:
    """``count`` OCR input rows: each paragraph of :func:`page_texts` rendered as a PNG page, in base64."""
    return [{"id": f"page-{i:06d}", "image": base64.b64encode(render_page(text)).decode("ascii")}
            for i, text in enumerate(page_texts(count, start=start), start=start)]
