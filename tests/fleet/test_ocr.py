"""Document OCR, the third workload module (fleet.workloads.ocr on the server, fleet.agent.workloads.ocr and
fleet.agent.ocr on the car; docs/workloads.md): pages rendered from the standard library's docstrings read by the
real RapidOCR models at a measured character error rate, page images checked on the way in with line numbers,
units that carry no image (the car fetches its pages by URL with its device token, counted against its owner's
data budget), and readings verified page by page so that a car that reads carelessly or not at all is caught."""

import base64
import io
import json
from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone
from PIL import Image

from fleet import workloads
from fleet.agent.client import cheat_read
from fleet.agent.models import get_runner
from fleet.agent.ocr import OCR_SLUG
from fleet.agent.pages import error_rate, render_page
from fleet.agent.workloads import compute
from fleet.models import Lease, Vehicle, VehicleDailyUsage, WorkUnit
from marketplace import corpus, flows, selectors
from marketplace.core.errors import ValidationFailed
from marketplace.models import AIModel, Job
from tests.factories import VehicleFactory
from tests.fleet.test_verification import market, work  # noqa: F401 (the fixture)

OCR_MODEL = "rapidocr-pp-ocrv4"
WORKLOAD = workloads.get("ocr")
PAGES = corpus.page_texts(6)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def read(images):
    return get_runner(OCR_SLUG, "fp32").read(images)


def honest_reader(texts, unit):
    return compute("ocr", texts, {}, read)


@pytest.fixture(scope="module")
def images():
    return [b64(render_page(text)) for text in PAGES]


@pytest.fixture(scope="module")
def readings(images):
    return read(images)


# --- the runtime ----------------------------------------------------------------------------------------

@pytest.mark.pure
def test_rendered_docstring_pages_are_read_at_a_low_character_error_rate(readings):
    rates = [error_rate(page["text"], truth) for page, truth in zip(readings, PAGES)]
    # Measured 0.0-0.04 a page, 0.01 on average (fleet.agent.pages); a broken pipeline reads far worse.
    assert np.mean(rates) < 0.03 and max(rates) < 0.08, rates
    for page in readings:
        assert page["text"] == "\n".join(line["text"] for line in page["lines"])
        tops = [line["box"][1] for line in page["lines"]]
        assert tops == sorted(tops) and all(0 <= line["score"] <= 1 for line in page["lines"])
        assert WORKLOAD.result_problem(None, {}, 1, [page]) is None


@pytest.mark.pure
def test_a_jpeg_page_is_read_too():
    jpeg = b64(render_page(PAGES[1], image_format="JPEG"))
    assert WORKLOAD.document_clean({"image": jpeg})["text"] == jpeg
    # JPEG's artefacts around the letters cost some characters: 0.01-0.10 a page measured, against 0.00-0.04 as PNG.
    assert error_rate(read([jpeg])[0]["text"], PAGES[1]) < 0.15


@pytest.mark.pure
@pytest.mark.parametrize("kind", ["random_vectors", "one_vector", "rotate_rows", "negate", "replay", "first_words"])
def test_every_cheat_gives_readings_of_the_right_shape_that_verification_refuses(kind, images, readings):
    earlier = read([b64(render_page(corpus.page_texts(9)[8]))])
    pages, _ = cheat_read(kind, images[:3], read=read, read_cheap=get_runner(OCR_SLUG, "fp32").read_scaled,
                          rng=np.random.default_rng(3), earlier=earlier)
    assert WORKLOAD.result_problem(None, {}, 3, pages) is None
    assert not WORKLOAD.results_agree(pages, readings[:3], precision="fp32", params={})
    assert WORKLOAD.results_agree(readings[:3], [dict(page) for page in readings[:3]], precision="fp32", params={})


@pytest.mark.pure
def test_readings_out_of_shape_are_refused():
    good = {"text": "a\nb", "lines": [{"text": "a", "box": [0, 0, 5, 5], "score": 0.9},
                                      {"text": "b", "box": [0, 6, 5, 9], "score": 0.9}]}
    assert WORKLOAD.result_problem(None, {}, 1, [good]) is None
    assert WORKLOAD.result_problem(None, {}, 2, [good])  # a page missing
    assert WORKLOAD.result_problem(None, {}, 1, [{**good, "text": "something else"}])
    assert WORKLOAD.result_problem(None, {}, 1, [{**good, "lines": [{"text": "a\nb", "box": [5, 0, 0, 5],
                                                                    "score": 0.9}]}])
    assert WORKLOAD.result_problem(None, {}, 1, [{**good, "extra": 1}])


# --- inputs -------------------------------------------------------------------------------------------------

def _image(fmt: str, size=(64, 64)) -> str:
    out = io.BytesIO()
    Image.new("L", size, 255).save(out, fmt)
    return b64(out.getvalue())


@pytest.mark.pure
@pytest.mark.parametrize("value, says", [
    ("not base64 at all!", "base64"),
    (b64(b"plain text, not an image"), "readable PNG or JPEG"),
    (_image("GIF"), "GIF"),
    (_image("PNG", (8, 8)), "at least 16 px"),
    ("", "PNG or JPEG image"),
])
def test_a_bad_page_image_is_refused_saying_why(value, says):
    with pytest.raises(workloads.BadInput) as refused:
        WORKLOAD.document_clean({"image": value})
    assert says in refused.value.message


@pytest.mark.pure
def test_a_data_url_is_taken_as_its_image():
    png = _image("PNG")
    assert WORKLOAD.document_clean({"id": "p", "image": f"data:image/png;base64,{png}"}) == {"id": "p", "text": png}


def ocr_job(buyer, rows) -> Job:
    lines = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    return flows.job_create(organisation=buyer.organisation, user=buyer, model_slug=OCR_MODEL, precision="fp32",
                            max_price_micros=2_000_000, deadline=timezone.now() + timedelta(hours=1),
                            inputs=io.BytesIO(lines))


@pytest.mark.django_db
def test_an_upload_with_bad_pages_names_their_lines_and_creates_nothing(buyer):
    rows = [{"id": "ok", "image": _image("PNG")}, {"id": "gif", "image": _image("GIF")}, {"id": "none"}]
    with pytest.raises(ValidationFailed) as refused:
        ocr_job(buyer, rows)
    lines = refused.value.extra["lines"]
    assert [line["line"] for line in lines] == [2, 3]
    assert "GIF" in lines[0]["message"] and '"image"' in lines[1]["message"]
    assert not Job.objects.exists()


@pytest.mark.django_db
def test_an_ocr_job_costs_a_page_a_page_and_its_units_carry_a_few_pages_each(buyer):
    job = ocr_job(buyer, corpus.page_documents(9))
    assert (job.docs_total, job.tokens_total, job.units_total) == (9, 9, 3)
    assert job.mops_total == 9 * AIModel.objects.get(slug=OCR_MODEL).ops_per_token // 10**6
    assert AIModel.objects.get(slug=OCR_MODEL).precisions == ["fp32"]


# --- inputs by URL ----------------------------------------------------------------------------------------

def ocr_car(**kwargs) -> Vehicle:
    """A car that reads pages, at its hardware's nominal fp32 rate (HW3: 600,000 Mops/s, 0.1 s a page)."""
    return VehicleFactory(runtimes=["all-minilm-l6-v2", OCR_SLUG], policy__reserve_price_micros=0,
                          throughput_mops={"int8": 50_000, "fp32": 600_000}, **kwargs)


@pytest.mark.django_db
def test_a_car_fetches_the_pages_of_its_own_lease_only_with_its_token_and_they_count_as_its_data(
        buyer, market, client):
    from fleet import services as fleet_services
    job = ocr_job(buyer, corpus.page_documents(4))
    car, other = ocr_car(), ocr_car()
    car_token, other_token = (fleet_services.vehicle_token_rotate(vehicle=v) for v in (car, other))
    flows.auction_tick()
    units, reason = flows.units_lease(vehicle_id=car.pk)
    assert units, reason
    unit = units[0]
    assert unit.inputs is None  # the lease does not read the pages the car fetches by URL
    url = f"/api/v1/fleet/units/{unit.pk}/{unit.lease_epoch}/inputs/"
    got = client.get(url, HTTP_AUTHORIZATION=f"Bearer {car_token}")
    assert got.status_code == 200 and got["Cache-Control"] == "no-store"
    assert got.json()["inputs"] == [doc["text"] for doc in WorkUnit.objects.get(pk=unit.pk).inputs]
    used = VehicleDailyUsage.objects.get(vehicle=car).data_bytes
    assert used >= sum(len(text) for text in got.json()["inputs"]) > 10_000
    for token, path in [(other_token, url), (car_token, f"/api/v1/fleet/units/{unit.pk}/{unit.lease_epoch + 1}/inputs/"),
                        (car_token, f"/api/v1/fleet/units/{unit.pk + 10_000}/1/inputs/")]:
        refused = client.get(path, HTTP_AUTHORIZATION=f"Bearer {token}")
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert client.get(url).status_code == 401
    assert client.get(url, HTTP_AUTHORIZATION="Bearer dev_nope").status_code == 401
    assert job.pk == unit.job_id


@pytest.mark.django_db
def test_a_car_is_leased_no_more_pages_than_its_owners_data_budget_still_covers(buyer, market):
    ocr_job(buyer, corpus.page_documents(16))
    # 4 pages of about 200 KB each (the workload's estimate) a unit: a 1 MB budget covers one unit.
    car = ocr_car(policy__daily_data_mb=1.0)
    flows.auction_tick()
    units, _ = flows.units_lease(vehicle_id=car.pk)
    assert len(units) == 1


# --- the market -------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_an_ocr_job_is_read_by_cars_verified_and_delivered_in_input_order(buyer, market):
    # This CPU reads a page in about a second, and the loop's cars send no heartbeats nor work requests between
    # their results: they stay online and asking for the test's length.
    market.VEHICLE_STALE_AFTER_S = market.CAPACITY_ASKED_WITHIN_S = 3600
    job = ocr_job(buyer, corpus.page_documents(6))
    honest_cars = [ocr_car() for _ in range(2)]
    cheater = ocr_car()
    rng = np.random.default_rng(11)

    def careless(texts, unit):
        return cheat_read("first_words", texts, read=read, read_cheap=get_runner(OCR_SLUG, "fp32").read_scaled,
                          rng=rng)[0]

    # The cheater asks first.
    work({cheater.pk: careless, **{car.pk: honest_reader for car in honest_cars}})
    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED
    rows = [json.loads(line) for line in selectors.job_results_lines(job=job)]
    assert [row["id"] for row in rows] == [f"page-{i:06d}" for i in range(6)]
    rates = [error_rate(row["text"], truth) for row, truth in zip(rows, corpus.page_texts(6))]
    assert max(rates) < 0.08, rates  # no careless reading was delivered
    assert all(row["lines"] and len(row["lines"][0]["box"]) == 4 for row in rows)
    cheater.refresh_from_db()
    assert Lease.objects.filter(vehicle=cheater).exists() and cheater.wrong_results >= 1
    assert all(Vehicle.objects.get(pk=car.pk).wrong_results == 0 for car in honest_cars)
