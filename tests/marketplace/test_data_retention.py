"""A job's data retention (docs/api.md, "Data retention and deletion"): a job's documents and results are
deleted on the buyer's request (API, page) or when its retention ends (the jobs-data-expire sweep); the
ledger, the meter records, the counts and the job stay, without content."""

import io
import json
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone
from rest_framework.test import APIClient

from billing.models import Clawback, LedgerEntry, MeterRecord, Reservation
from billing.selectors import unbalanced_transaction_ids
from fleet.models import Lease, WorkUnit
from marketplace import flows, selectors, services, tasks
from marketplace.models import Batch, BatchFile, Job, JobEvent
from tests.factories import BuyerFactory, VehicleFactory
from tests.marketplace.test_api_webhooks import complete_units
from tests.support.capacity import deliver

pytestmark = pytest.mark.django_db

MODEL = "all-minilm-l6-v2"


def texts_of(job: Job) -> list[str]:
    return [doc["text"] for unit in WorkUnit.objects.filter(job=job) for doc in unit.inputs]


def content_left(job: Job) -> list:
    """Every field of the job's units and leases that can hold a document or a vector, where it is not empty."""
    units = WorkUnit.objects.filter(job=job)
    return ([("inputs", pk) for pk, value in units.values_list("pk", "inputs") if value]
            + [("result", pk) for pk, value in units.values_list("pk", "result") if value is not None]
            + [("reference", pk) for pk, value in units.values_list("pk", "reference") if value is not None]
            + [("lease.result", pk) for pk, value in Lease.objects.filter(unit__job=job).values_list("pk", "result")
               if value is not None])


def money_of(job: Job) -> dict:
    return {"meter": list(MeterRecord.objects.filter(job=job).order_by("pk").values_list("pk", "charge_femto", "mops")),
            "entries": list(LedgerEntry.objects.order_by("pk").values_list("pk", "amount_minor")),
            "reservation": list(Reservation.objects.filter(job=job).values_list("status", "charged_femto"))}


def request_line(custom_id: str, text) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": text}}


def batch_for(buyer, rows: list, **options) -> Batch:
    content = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    file = services.batch_file_create(organisation=buyer.organisation, user=buyer, upload=io.BytesIO(content),
                                      filename="requests.jsonl", purpose="batch")
    return flows.batch_create(organisation=buyer.organisation, user=buyer, input_file_id=file.public_id,
                              endpoint="/v1/embeddings", completion_window="24h", **options)


# --- the flow ------------------------------------------------------------------------------------------

def test_a_finished_jobs_data_deleted_wipes_every_content_field_and_keeps_the_ledger_and_meter_records(make_job, buyer):
    # Given a completed job of two units, with a platform reference and a car's result waiting on a lease row,
    job = make_job(docs=16)
    complete_units(job, 2)
    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED and len(texts_of(job)) == 16
    # its data kept 30 days (the files' default) after it finished,
    assert job.data_expires_at == job.finished_at + timedelta(seconds=django_settings.BATCH_FILE_RETENTION_S)
    unit = WorkUnit.objects.filter(job=job).first()
    WorkUnit.objects.filter(pk=unit.pk).update(reference=unit.result)
    Lease.objects.filter(unit=unit).update(result=unit.result)
    before, counts = money_of(job), (job.docs_total, job.tokens_total, job.units_done, job.units_total)
    assert before["meter"] and not unbalanced_transaction_ids()
    # when its data is deleted,
    job = flows.job_data_delete(job=job, by=buyer)
    # then no document or vector is left in any of its units or leases,
    assert content_left(job) == [] and texts_of(job) == []
    # the job stays, with its counts, state and history, and says when its data went,
    assert job.data_deleted_at is not None and job.state == Job.State.COMPLETED
    assert (job.docs_total, job.tokens_total, job.units_done, job.units_total) == counts
    assert WorkUnit.objects.filter(job=job, state=WorkUnit.State.DONE).count() == 2
    assert list(job.events.filter(kind=JobEvent.Kind.DATA_DELETED).values_list("by", flat=True)) == [buyer.pk]
    # and the meter records, the ledger and the reservation are untouched and balanced.
    assert money_of(job) == before and not unbalanced_transaction_ids()
    # Deleting again changes nothing.
    assert flows.job_data_delete(job=job).data_deleted_at == job.data_deleted_at
    assert job.events.filter(kind=JobEvent.Kind.DATA_DELETED).count() == 1


def test_a_car_caught_after_a_jobs_data_was_deleted_is_clawed_back_and_no_content_comes_back(make_job):
    # Given a completed job whose data is deleted, its results accepted unchecked from one car,
    job = make_job(docs=16)
    complete_units(job, 2)
    job = flows.job_data_delete(job=job)
    car = WorkUnit.objects.filter(job=job).first().completed_by
    # when that car is caught cheating elsewhere,
    assert flows.vehicle_caught(vehicle_id=car.pk) == 2
    # then its earnings for the job are clawed back, balanced, but no unit waits for the platform to correct it,
    assert Clawback.objects.count() == 2 and not unbalanced_transaction_ids()
    assert not WorkUnit.objects.filter(job=job, verify=WorkUnit.Verify.ARBITER).exists()
    # and nothing is computed back into the wiped units.
    assert content_left(job) == []


def test_an_open_jobs_data_deleted_cancels_it_first_withdraws_its_leases_and_refuses_the_cars_late_result(make_job,
                                                                                                          buyer):
    # Given a running job with units leased to a car,
    job = make_job(docs=24)
    car = VehicleFactory()
    deliver(car, mops_per_s=50_000)
    flows.auction_tick()
    units, why = flows.units_lease(vehicle_id=car.pk, max_units=2)
    assert len(units) == 2, why
    # when the buyer deletes its data,
    job = flows.job_data_delete(job=job, by=buyer)
    # then it is cancelled (its leases withdrawn, its budget released) and its units hold nothing,
    assert job.state == Job.State.CANCELLED and job.data_deleted_at is not None
    assert set(Lease.objects.filter(unit__job=job).values_list("outcome", flat=True)) == {Lease.Outcome.CANCELLED}
    assert Reservation.objects.get(job=job).status != Reservation.Status.ACTIVE
    assert content_left(job) == []
    assert list(job.events.values_list("kind", flat=True))[-2:] == [JobEvent.Kind.CANCELLED, JobEvent.Kind.DATA_DELETED]
    # and the car's result for a withdrawn lease is refused, unpaid.
    accepted, _ = flows.unit_complete(vehicle_id=car.pk, unit_id=units[0].pk, epoch=units[0].lease_epoch,
                                      result=[])
    assert not accepted and not MeterRecord.objects.filter(job=job).exists()
    assert not unbalanced_transaction_ids()


def test_a_batch_jobs_data_deleted_deletes_its_files_and_requests_and_the_batch_stays_cancelled(buyer):
    # Given a running batch whose files are kept an hour (output_expires_after),
    batch = batch_for(buyer, [request_line(f"r{i}", f"document number {i}") for i in range(3)],
                      output_expires_after_s=3600)
    job = batch.job
    assert job.data_retention_s == 3600
    input_id = batch.input_file_public_id
    # when its job's data is deleted,
    flows.job_data_delete(job=job, by=buyer)
    batch.refresh_from_db()
    # then the batch is cancelled and finalized, its input, output and error files are gone with its requests,
    assert batch.finalized_at is not None and batch.requests == [] and batch.line_errors == []
    assert not BatchFile.objects.filter(organisation=buyer.organisation).exists()
    assert batch.input_file_public_id == input_id  # the ids stay, as after DELETE /v1/files/{id}
    batch = Batch.objects.select_related("job").get(pk=batch.pk)
    assert selectors.batch_status(batch) == "cancelled"
    assert content_left(job) == []
    # and the retention of a batch's job is its output_expires_after.
    other = batch_for(buyer, [request_line("a", "another document")], output_expires_after_s=7200).job
    flows.job_cancel(job=other)
    other.refresh_from_db()
    assert other.data_expires_at == other.finished_at + timedelta(seconds=7200)


def test_deleting_a_batchs_input_file_leaves_its_job_running_as_at_openai(buyer, api):
    # Given a running batch, when its input file is deleted through the Files API,
    batch = batch_for(buyer, [request_line("a", "a document"), request_line("b", "another")])
    assert api.delete(f"/v1/files/{batch.input_file_public_id}").json()["deleted"] is True
    # then the file is gone, but the batch runs on: its job keeps its own copy until its retention ends or
    # its data is deleted (docs/api.md, "Differences from OpenAI, honestly").
    assert api.get(f"/v1/files/{batch.input_file_public_id}").status_code == 404
    job = Job.objects.get(pk=batch.job_id)
    assert job.state in Job.OPEN_STATES and job.data_deleted_at is None and texts_of(job)


# --- the sweep -----------------------------------------------------------------------------------------

def test_the_sweep_deletes_the_data_of_closed_jobs_past_their_retention_only(make_job, settings):
    # Given a closed job past its retention, a closed job within it, and an open job,
    expired, kept, running = make_job(docs=8), make_job(docs=8), make_job(docs=8)
    for job in (expired, kept):
        flows.job_cancel(job=job)
    Job.objects.filter(pk=expired.pk).update(data_expires_at=timezone.now() - timedelta(seconds=1))
    assert Job.objects.get(pk=running.pk).data_expires_at is None
    # when the periodic task runs (as beat and the embedded scheduler call it),
    assert settings.CELERY_BEAT_SCHEDULE["jobs-data-expire"]["task"] == "marketplace.tasks.jobs_data_expire"
    assert tasks.jobs_data_expire() == 1
    # then only the expired job's data is deleted, by the sweep (no one named in its history),
    assert content_left(expired) == [] and Job.objects.get(pk=expired.pk).data_deleted_at is not None
    assert expired.events.get(kind=JobEvent.Kind.DATA_DELETED).by is None
    for job in (kept, running):
        assert texts_of(job) and Job.objects.get(pk=job.pk).data_deleted_at is None
    # and it runs once.
    assert tasks.jobs_data_expire() == 0


# --- the API and the page ------------------------------------------------------------------------------

def test_the_api_deletes_a_jobs_data_for_its_organisation_only_and_its_results_answer_410(api, make_job):
    job = make_job(docs=8)
    assert api.get(f"/api/v1/jobs/{job.pk}/").json()["data_expires_at"] is None
    # Another organisation cannot delete it (404) nor learn that it exists,
    other = BuyerFactory()
    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION="Bearer " + services.api_key_create(
        organisation=other.organisation, name="x", created_by=other)[1])
    response = stranger.delete(f"/api/v1/jobs/{job.pk}/data/")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert texts_of(job)
    # its own organisation deletes it: the answer is the job, cancelled, with when its data went,
    response = api.delete(f"/api/v1/jobs/{job.pk}/data/")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == job.pk and body["state"] == "cancelled" and body["data_deleted_at"]
    assert body["data_expires_at"] and content_left(job) == []
    # its results answer 410 in the stable error shape,
    response = api.get(f"/api/v1/jobs/{job.pk}/results/")
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "job_data_deleted" and "deleted" in response.json()["error"]["message"]
    # and deleting again is harmless.
    assert api.delete(f"/api/v1/jobs/{job.pk}/data/").json()["data_deleted_at"] == body["data_deleted_at"]


def test_the_job_page_shows_when_the_data_goes_and_deletes_it_after_a_confirmation(client, buyer, make_job):
    job = make_job(docs=8)
    client.force_login(buyer)
    page = client.get(f"/buyer/jobs/{job.pk}/").content.decode()
    assert "deleted 30 days after the job finishes" in page and f"/buyer/jobs/{job.pk}/delete-data/" in page
    assert "after it finishes" in client.get("/buyer/").content.decode()
    flows.job_cancel(job=job)
    job.refresh_from_db()
    page = client.get(f"/buyer/jobs/{job.pk}/").content.decode()
    assert f"deleted on {timezone.localtime(job.data_expires_at):%Y-%m-%d %H:%M} UTC" in page
    # The button leads to a confirmation step, which deletes nothing,
    confirm = client.get(f"/buyer/jobs/{job.pk}/delete-data/")
    assert confirm.status_code == 200 and "This cannot be undone" in confirm.content.decode()
    assert Job.objects.get(pk=job.pk).data_deleted_at is None
    # another organisation's member gets a 404 for both steps,
    stranger = BuyerFactory()
    client.force_login(stranger)
    assert client.get(f"/buyer/jobs/{job.pk}/delete-data/").status_code == 404
    assert client.post(f"/buyer/jobs/{job.pk}/delete-data/").status_code == 404
    assert Job.objects.get(pk=job.pk).data_deleted_at is None
    # and confirming deletes the data; the page then says so and offers no download,
    client.force_login(buyer)
    response = client.post(f"/buyer/jobs/{job.pk}/delete-data/", follow=True)
    page = response.content.decode()
    assert response.redirect_chain[-1][0] == f"/buyer/jobs/{job.pk}/"
    assert "Deleted</strong> on" in page and "is deleted" in page
    assert 'data-testid="download"' not in page and 'data-testid="delete-data"' not in page
    assert content_left(job) == []
    dashboard = client.get("/buyer/").content.decode()
    assert f"deleted {timezone.localtime(job.data_deleted_at):%Y-%m-%d}" in dashboard
    # and the download link, if kept, answers with a message instead of a file.
    response = client.get(f"/buyer/jobs/{job.pk}/results/", follow=True)
    assert response.redirect_chain[-1][0] == f"/buyer/jobs/{job.pk}/"
    assert "was deleted on" in response.content.decode()
