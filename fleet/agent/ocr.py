"""The car's OCR runtime: RapidOCR (PP-OCRv4 detection and recognition, and the PP-OCR text-angle classifier,
three ONNX graphs shipped in the ``rapidocr-onnxruntime`` wheel, Apache-2.0) run by onnxruntime on the CPU.

FP32 only: onnxruntime's dynamic int8 quantisation of these graphs made them 2.5-4 times slower on this CPU and
their reading garbage (docs/workloads.md, "Document OCR"), so a car sells OCR in the fp32 market.

A page is an image file (PNG or JPEG) as base64; its reading is ``{"text", "lines"}``: each line's text, its box
(``[left, top, right, bottom]`` in the image's pixels) and the recogniser's confidence, top to bottom; the
page's text is its lines' joined by newlines."""

import base64
import importlib.util
import io
import threading

import numpy as np

#: The catalogue's name for this runtime (fleet.workloads.ocr, fleet.agent.models.MODELS).
OCR_SLUG = "rapidocr-pp-ocrv4"
#: Decimals of a line's confidence on the wire.
SCORE_DECIMALS = 4
#: The three ONNX graphs' bytes (detection 4,745,517, recognition 10,857,958, angle 585,532).
SIZE_BYTES = 16_189_007
#: What one page costs in a car's time, as operations: the reference machine (docs/workloads.md) read a page of
#: fleet.agent.pages (1240 px wide, 8 lines of 12 pt text) in about 1.2 s on 2 threads, where its fp32 encoder
#: ran at about 55,000 mega-ops/s; 1.2 x 55,000 Mops. OCR's arithmetic per page is not its time (the detector
#: scales every page to at least 736 px, recognition is per line): like every workload's figure, this one only
#: has to put a page's time in the same scale as a token's. A car's fp32 rate is measured on its encoder at hello
#: (fleet.agent.client.measure_mops), then from its results, OCR units included.
OPS_PER_PAGE = 66_000_000_000

_ENGINE = None
_ENGINE_LOCK = threading.Lock()


def _engine(threads: int):
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            from rapidocr_onnxruntime import RapidOCR  # imported on first use: opencv takes 0.3 s to load

            _ENGINE = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)
        return _ENGINE


def installed() -> bool:
    """Whether RapidOCR is installed (it is imported on first use only)."""
    return importlib.util.find_spec("rapidocr_onnxruntime") is not None


def decode_image(image_b64: str) -> bytes:
    return base64.b64decode(image_b64, validate=True)


def page_reading(result) -> dict:
    """RapidOCR's answer for one page (a list of [quadrilateral, text, confidence], or None for no text) as a
    page's reading, lines top to bottom, then left to right."""
    lines = []
    for quad, text, score in result or []:
        points = np.asarray(quad, dtype=np.float64)
        left, top = np.floor(points.min(axis=0)).astype(int).tolist()
        right, bottom = np.ceil(points.max(axis=0)).astype(int).tolist()
        lines.append({"text": str(text), "box": [max(0, left), max(0, top), max(0, right), max(0, bottom)],
                      "score": round(float(score), SCORE_DECIMALS)})
    lines.sort(key=lambda line: (line["box"][1], line["box"][0]))
    return {"text": "\n".join(line["text"] for line in lines), "lines": lines}


class OcrRunner:
    """Reads pages; share one per process (fleet.agent.models.get_runner). onnxruntime sessions are
    thread-safe, RapidOCR's Python around them keeps no state between calls."""

    def __init__(self, threads: int):
        self._threads = threads

    def read(self, images_b64: list[str]) -> list[dict]:
        """Each page's reading, in order."""
        engine = _engine(self._threads)
        return [page_reading(engine(decode_image(image))[0]) for image in images_b64]

    infer = read

    def read_scaled(self, images_b64: list[str], scale: float) -> list[dict]:
        """Each page read from a copy shrunk by ``scale`` (the simulator's cheap cheat), boxes in the original's
        pixels."""
        from PIL import Image

        engine = _engine(self._threads)
        pages = []
        for image in images_b64:
            with Image.open(io.BytesIO(decode_image(image))) as page:
                small = page.convert("L").resize((max(1, int(page.width * scale)), max(1, int(page.height * scale))))
            reading = page_reading(engine(np.asarray(small))[0])
            for line in reading["lines"]:
                line["box"] = [int(v / scale) for v in line["box"]]
            pages.append(reading)
        return pages

