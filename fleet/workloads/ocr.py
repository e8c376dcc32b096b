"""Document OCR: each page image (PNG or JPEG) comes back as its text, with a box around every line.

Priced per page (shown per thousand pages). A page is far larger than a sentence, so its unit does not carry it:
the car fetches the unit's pages over HTTPS with its device token (docs/vehicle-protocol.md, "Inputs by URL"),
those bytes count against its owner's data budget, and units are small (DOCS_PER_UNIT pages) so that a car on
a 5 Mbps link fetches one in about a second. The car's runtime: fleet.agent.workloads.ocr on RapidOCR
(fleet.agent.ocr), FP32 only.

Verification compares readings page by page: two readings of one page agree when their character error rate
(edits per character of the longer, whitespace normalised) is at most CER_TOLERANCE (docs/verification.md)."""

import base64
import binascii
import io
import math
import re

from PIL import Image, UnidentifiedImageError

from fleet.agent.ocr import OCR_SLUG, OPS_PER_PAGE, SIZE_BYTES
from fleet.agent.pages import edit_distance, normalise
from fleet.workloads.base import PAGES, BadInput, CatalogueEntry, ModelInfo, Workload

#: The largest page image accepted, as a file (base64 in a JSON line takes a third more).
MAX_IMAGE_BYTES = 6 * 1024 * 1024
#: Pixels a page may have at most (a 600 dpi A4 scan has 35 million); RapidOCR reads it shrunk to 2,000 px on
#: its longer side in any case.
MAX_PIXELS = 40_000_000
MIN_SIDE = 16
#: Pages a unit holds: a unit of 4 pages of about 200 KB is fetched in about 1.3 s over 5 Mbps and read in
#: 4-6 s on the reference machine.
DOCS_PER_UNIT = 4
#: The largest character error rate at which two readings of one page agree. Measured (tests/bench/workloads.py,
#: docs/verification.md "Document OCR"): honest readings on 1 and 2 threads were identical on every page; the
#: closest cheat of the agent's (first_words: the page read at half its size) differed by 0.056 at least.
CER_TOLERANCE = 0.02
MAX_LINES = 2_000
MAX_PAGE_TEXT = 100_000
MAX_INPUTS_PER_REQUEST = 16
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg);base64,", re.IGNORECASE)
_FORMATS = {"PNG", "JPEG"}


def image_clean(value, *, param: str = "image") -> str:
    """A page image (base64, or a ``data:image/png;base64,`` URL) checked: a PNG or JPEG file within the size
    limits. Returns its base64 without the URL's prefix (raise BadInput)."""
    if not isinstance(value, str) or not value.strip():
        raise BadInput('a page must be a PNG or JPEG image in base64 (or a "data:image/png;base64," URL)',
                       param=param)
    data = _DATA_URL.sub("", value.strip(), count=1)
    if len(data) > math.ceil(MAX_IMAGE_BYTES / 3) * 4:
        raise BadInput(f"the image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("the image is not valid base64", param=param) from None
    try:
        with Image.open(io.BytesIO(raw)) as page:
            image_format, (width, height) = page.format, page.size
            if image_format not in _FORMATS:
                raise BadInput(f"the image is {image_format}; send PNG or JPEG", param=param)
            page.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
        raise BadInput("the image is not a readable PNG or JPEG file", param=param) from None
    if width < MIN_SIDE or height < MIN_SIDE or width * height > MAX_PIXELS:
        raise BadInput(f"the image is {width} x {height} px; a page must be at least {MIN_SIDE} px on each side "
                       f"and at most {MAX_PIXELS // 1_000_000} million pixels", param=param)
    return data


def reading_error(a: str, b: str) -> float:
    """Character error rate between two readings of one page: edits per character of the longer one, whitespace
    normalised (0 for two empty pages)."""
    a, b = normalise(a), normalise(b)
    return edit_distance(a, b) / max(1, len(a), len(b))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _page_problem(page, index: int) -> str | None:
    if not isinstance(page, dict) or set(page) != {"text", "lines"}:
        return f"page {index} must be {{text, lines}}"
    lines = page["lines"]
    if not isinstance(page["text"], str) or len(page["text"]) > MAX_PAGE_TEXT:
        return f"page {index}'s text must be a string of at most {MAX_PAGE_TEXT} characters"
    if not isinstance(lines, list) or len(lines) > MAX_LINES:
        return f"page {index}'s lines must be a list of at most {MAX_LINES}"
    for line in lines:
        if (not isinstance(line, dict) or set(line) != {"text", "box", "score"} or not isinstance(line["text"], str)
                or not isinstance(line["box"], list) or len(line["box"]) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in line["box"])
                or line["box"][0] > line["box"][2] or line["box"][1] > line["box"][3]
                or not _number(line["score"]) or not 0 <= line["score"] <= 1):
            return f"page {index}: each line must be {{text, box: [left, top, right, bottom], score in [0, 1]}}"
    if page["text"] != "\n".join(line["text"] for line in lines):
        return f"page {index}'s text must be its lines' joined by newlines"
    return None


class DocumentOcr(Workload):
    task = "ocr"
    title = "Document OCR"
    consent = "reading scanned pages (page images are fetched over your car's connection)"
    price_unit = PAGES
    batch_url = "/v1/ocr"
    order = 30
    inline_inputs = False
    input_example = '{"id": "p1", "image": "iVBORw0KGgo... (a PNG or JPEG page in base64)"}'
    input_limits = f"PNG or JPEG pages of up to {MAX_IMAGE_BYTES // (1024 * 1024)} MB"
    demo_input = "page"
    demo_docs = 12  # a page takes a car sharing this CPU with five others several seconds
    docs_per_unit = DOCS_PER_UNIT
    max_line_bytes = math.ceil(MAX_IMAGE_BYTES / 3) * 4 + 4096
    result_bytes_per_doc = 4_096
    input_bytes_per_doc = 200_000
    catalogue = (CatalogueEntry(
        slug="rapidocr-pp-ocrv4", name="RapidOCR PP-OCRv4 (printed text)", runtime=OCR_SLUG, precisions=("fp32",),
        dims=0, max_tokens=0, ops_per_unit=OPS_PER_PAGE, licence="Apache-2.0", size_bytes=SIZE_BYTES,
        description="Reads scanned or photographed pages (PNG or JPEG): each page's text, and every line with "
                    "its box and confidence. Printed Latin and Chinese script; not handwriting."),)

    def document_clean(self, row: dict) -> dict:
        """``{"id", "image": base64 PNG or JPEG, or a data URL}``. The document's ``text`` is the image's base64:
        what the car fetches."""
        if "image" not in row:
            raise BadInput('each line needs "image": a PNG or JPEG page in base64', param="image")
        return {"id": row.get("id"), "text": image_clean(row["image"])}

    def input_row(self, doc_id, payload: str) -> dict:
        return {"id": doc_id, "image": payload}

    def costs(self, model: ModelInfo, docs: list[dict]) -> list[int]:
        return [1] * len(docs)

    def estimate_costs(self, model: ModelInfo, *, docs: int, chars: int) -> int:
        return docs

    def result_problem(self, model: ModelInfo, params: dict, docs: int, result: list) -> str | None:
        if not isinstance(result, list) or len(result) != docs:
            return f"expected {docs} pages, got {len(result) if isinstance(result, list) else 'none'}"
        for index, page in enumerate(result):
            if problem := _page_problem(page, index):
                return problem
        return None

    def results_agree(self, a: list, b: list, *, precision: str, params: dict) -> bool:
        """Page by page: one page read wrong makes the result wrong."""
        if len(a) != len(b) or not a:
            return False
        try:
            return all(reading_error(x["text"], y["text"]) <= CER_TOLERANCE for x, y in zip(a, b))
        except (KeyError, TypeError):
            return False

    def result_row(self, item, params: dict) -> dict:
        return {"text": item["text"], "lines": item["lines"]}

    summary_title = "Read so far"
    summary_note = "Each page's text, and its lines with their boxes and confidence, are in the results download."

    def preview(self, doc: dict, item) -> dict:
        """The page beside its text."""
        kind = "jpeg" if doc["text"].startswith("/9j/") else "png"
        return {"image": f"data:image/{kind};base64,{doc['text']}", "text": item["text"]}

    def summary(self, items, params: dict) -> list[tuple[str, int]]:
        pages = lines = characters = 0
        for item in items:
            pages += 1
            lines += len(item["lines"])
            characters += len(item["text"])
        return [("pages read", pages), ("lines", lines), ("characters", characters)]

    def batch_request(self, body: dict, model: ModelInfo) -> tuple[list[str], dict, dict]:
        """``input``: one page image (base64 or a data URL) or a list of them."""
        value = body.get("input")
        images = value if isinstance(value, list) else [value]
        if not images or len(images) > MAX_INPUTS_PER_REQUEST:
            raise BadInput(f'"input" must be a page image or a list of 1 to {MAX_INPUTS_PER_REQUEST}.',
                           param="body.input")
        return [image_clean(image, param="body.input") for image in images], {}, {}

    def batch_response(self, items: list, *, options: dict, params: dict, model: str, usage: int) -> dict:
        data = [{"object": "ocr.page", "index": index, **self.result_row(item, params)}
                for index, item in enumerate(items)]
        return {"object": "list", "data": data, "model": model, "usage": {"pages": usage}}


WORKLOAD = DocumentOcr()
