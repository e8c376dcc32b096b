"""Document OCR on the car (the server side and the rules: fleet.workloads.ocr): each page image read by the
car's OCR runtime (fleet.agent.ocr) into its text and line boxes. The pages are not in the unit.assign: the
agent fetches them over HTTPS first (docs/vehicle-protocol.md, "Inputs by URL")."""

TASK = "ocr"


def run(images_b64: list[str], params: dict, read) -> list:
    return read(images_b64)
