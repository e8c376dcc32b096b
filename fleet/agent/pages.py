"""Page images with known text, and how far a reading is from a text (the character error rate).

Tests, the demo buyer and the benchmarks need scanned-looking pages without downloading any: they are rendered
here from real text (the standard library's docstrings, marketplace.corpus) with Pillow, in DejaVu Sans where the
machine has it (Debian's fonts-dejavu-core) and Pillow's own scalable font otherwise. The size and spacing are
those of a page printed at 12 pt and scanned at 150 dpi (A4 is 1240 px wide), at which RapidOCR reads the
corpus at a character error rate of about 1 % (tests/fleet/test_ocr.py measures it)."""

import io
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
PAGE_WIDTH = 1240
FONT_SIZE = 28
LINE_HEIGHT = 46
MARGIN = 50
#: Characters per line: what fits PAGE_WIDTH at FONT_SIZE with the margins.
LINE_CHARS = 55


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if FONT_PATH.exists():
        return ImageFont.truetype(str(FONT_PATH), size)
    return ImageFont.load_default(size=size)


def page_lines(text: str) -> list[str]:
    """The lines ``text`` is set in on a page."""
    return textwrap.wrap(" ".join(text.split()), width=LINE_CHARS) or [""]


def render_page(text: str, *, image_format: str = "PNG") -> bytes:
    """``text`` set on a white page as an image file (PNG, or JPEG): black DejaVu Sans at FONT_SIZE px."""
    lines = page_lines(text)
    page = Image.new("L", (PAGE_WIDTH, 2 * MARGIN + LINE_HEIGHT * len(lines)), 255)
    draw = ImageDraw.Draw(page)
    font = _font(FONT_SIZE)
    for row, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + row * LINE_HEIGHT), line, font=font, fill=0)
    out = io.BytesIO()
    page.save(out, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return out.getvalue()


def normalise(text: str) -> str:
    """Text as the error rate compares it: runs of whitespace (line breaks included) are one space."""
    return " ".join(text.split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions of one character), a row of the table at a
    time in numpy: a page of 1,000 characters against another takes a few milliseconds."""
    if not a or not b:
        return len(a) or len(b)
    right = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    steps = np.arange(len(b) + 1)
    row = steps.copy()
    codes = np.frombuffer(a.encode("utf-32-le"), dtype=np.uint32)
    for i, code in enumerate(codes, start=1):
        step = np.empty_like(row)
        step[0] = i
        # Deletion (from the row above) or substitution (diagonal); insertion along the row is a running minimum.
        step[1:] = np.minimum(row[1:] + 1, row[:-1] + (right != code))
        row = steps + np.minimum.accumulate(step - steps)
    return int(row[-1])


def error_rate(reading: str, truth: str) -> float:
    """Character error rate of ``reading`` against ``truth``: edits per character of the truth, whitespace
    normalised (1.0 or more for a reading that has nothing in common with it)."""
    reading, truth = normalise(reading), normalise(truth)
    return edit_distance(reading, truth) / max(1, len(truth))
