"""Verified results (docs/verification.md): a result of the right shape is a claim. Cars that cheat in each
way the agent knows (fleet.agent.client.cheat_embed) beside honest ones, through the real flows and the real
embedding runtime: no wrong row is delivered or paid, cheaters are caught, suspended and clawed back, honest
cars never are."""

import json

import numpy as np
import pytest
from django.db.models import Sum

from billing.models import Clawback, LedgerEntry, MeterRecord
from fleet import services as fleet_services
from fleet import verification
from fleet.agent.client import cheat_embed, encode_embeddings
from fleet.agent.models import get_runner
from fleet.models import Lease, Vehicle, WorkUnit
from marketplace import flows
from marketplace.models import Job
from tests.factories import VehicleFactory

RUNTIME = "all-minilm-l6-v2"


def _embed(texts):
    return get_runner(RUNTIME, "int8").embed(texts)


def honest(texts, unit=None):
    return encode_embeddings(_embed(texts))


def cheat(kind):
    rng = np.random.default_rng(7)
    earlier = _embed(["An earlier unit's text, about something else entirely."] * 3)

    def send(texts, unit=None):
        vectors, _ = cheat_embed(kind, texts, embed=_embed, dims=384, rng=rng, earlier=earlier)
        return encode_embeddings(vectors)
    return send


def work(cars: dict, *, rounds: int = 60) -> None:
    """Each car (vehicle id -> how it computes: ``compute(texts, unit)``) asks for work and answers, round after round, and the platform
    arbitrates what waits for it (the flow its Celery task runs, called here; the end-to-end tests run the
    task), until nothing is left."""
    for _ in range(rounds):
        for unit_id in WorkUnit.objects.filter(verify=WorkUnit.Verify.ARBITER).values_list("pk", flat=True):
            flows.unit_arbitrate(unit_id=unit_id)
        flows.auction_tick()
        busy = False
        for vehicle_id, compute in cars.items():
            units, _ = flows.units_lease(vehicle_id=vehicle_id)
            for unit in units:
                busy = True
                texts = ([d["text"] for d in unit.inputs] if unit.inputs is not None  # else fetched by URL, as a car
                         else fleet_services.unit_inputs_fetch(vehicle=Vehicle.objects.get(pk=vehicle_id),
                                                               unit_id=unit.pk, epoch=unit.lease_epoch))
                accepted, _ = flows.unit_complete(vehicle_id=vehicle_id, unit_id=unit.pk, epoch=unit.lease_epoch,
                                                  result=compute(texts, unit))
                assert accepted  # a well-formed result is accepted whatever its judgement: the car learns nothing
        waiting = WorkUnit.objects.filter(state=WorkUnit.State.QUEUED) | WorkUnit.objects.filter(
            verify=WorkUnit.Verify.ARBITER)
        if not busy and not waiting.exists():
            return


@pytest.fixture
def market(verifying):
    """Verification as deployed, in a market where rounds follow each other at once (the work loop does not
    wait): capacity a car leaves unused is taken back in the same round (CAPACITY_RECLAIM_AFTER_S 0)."""
    verifying.CAPACITY_RECLAIM_AFTER_S = 0
    return verifying


def delivered_wrong(job: Job) -> int:
    wrong = 0
    for unit in WorkUnit.objects.filter(job=job, state=WorkUnit.State.DONE):
        truth = honest([d["text"] for d in unit.inputs])
        wrong += not verification.results_agree(unit.result, truth, precision="int8")
    return wrong


def owner_earned_minor(vehicle: Vehicle) -> int:
    return LedgerEntry.objects.filter(account__owner=vehicle.owner, account__kind="owner").aggregate(
        total=Sum("amount_minor"))["total"] or 0


@pytest.mark.pure
def test_the_rate_falls_with_a_cars_record_and_is_one_after_a_wrong_result():
    rate = lambda streak, wrong=0: verification.replication_rate(  # noqa: E731
        verification.Standing(streak=streak, wrong_recent=wrong), probation=3, floor=0.04)
    assert [rate(s) for s in (0, 1, 2)] == [1.0, 1.0, 1.0]
    assert rate(3) == 0.75 and rate(29) == 0.1 and rate(10_000) == 0.04
    assert rate(10_000, wrong=1) == 1.0
    assert verification.units_to_catch(rate=0.04, quantile=0.95) == 74
    assert verification.miss_chance(rate=0.04, wrong_units=74) < 0.05 < verification.miss_chance(rate=0.04, wrong_units=73)


@pytest.mark.pure
@pytest.mark.parametrize("kind", ["random_vectors", "one_vector", "rotate_rows", "negate", "replay", "first_words"])
def test_every_cheat_disagrees_with_the_honest_result_and_honest_runs_agree(kind):
    texts = ["The quick brown fox jumps over the lazy dog near the river bank.",
             "Return a new list containing all items from the iterable in ascending order.",
             "Raise ValueError if the value is not present in the sequence at all."]
    truth = honest(texts)
    assert verification.results_agree(honest(texts), truth, precision="int8")
    assert not verification.results_agree(cheat(kind)(texts), truth, precision="int8")


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["random_vectors", "one_vector", "rotate_rows", "negate", "replay", "first_words"])
def test_a_cheating_car_beside_honest_ones_is_caught_suspended_and_delivers_nothing(market, make_job, kind):
    job = make_job(docs=96)
    liar = VehicleFactory(policy__reserve_price_micros=0)
    good = [VehicleFactory(policy__reserve_price_micros=0) for _ in range(2)]
    work({liar.pk: cheat(kind), **{car.pk: honest for car in good}})

    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED
    assert delivered_wrong(job) == 0
    liar.refresh_from_db()
    assert liar.suspended_at is not None and liar.wrong_results >= verification.SUSPEND_AFTER_WRONG
    assert "disagreed" in liar.suspension_reason
    # Paid nothing: every result it was paid for (none, here: every result of a new car is checked) is clawed back.
    paid = MeterRecord.objects.filter(vehicle=liar, role="buyer", clawback=None).count()
    assert paid == 0 and owner_earned_minor(liar) <= 0
    for car in good:
        car.refresh_from_db()
        assert car.suspended_at is None and car.wrong_results == 0 and car.checks_passed > 0
    assert not Lease.objects.filter(vehicle__in=good, verdict="wrong").exists()
    # The ledger still balances, and the buyer paid for each unit once.
    assert (LedgerEntry.objects.aggregate(total=Sum("amount_minor"))["total"] or 0) == 0
    assert MeterRecord.objects.filter(job=job, role="buyer", clawback=None).count() == job.units_total


@pytest.mark.django_db
def test_a_car_that_builds_trust_then_cheats_is_caught_and_its_unchecked_results_are_voided(market, make_job):
    """Honest long enough to be checked rarely, then negated vectors: caught at its first check, its unchecked
    results voided (clawed back, computed again by others), none delivered."""
    job = make_job(docs=800)
    turncoat = VehicleFactory(policy__reserve_price_micros=0)
    good = [VehicleFactory(policy__reserve_price_micros=0) for _ in range(2)]
    Vehicle.objects.filter(pk=turncoat.pk).update(results_streak=10_000)  # a long honest record
    work({turncoat.pk: cheat("negate"), **{car.pk: honest for car in good}}, rounds=200)

    job.refresh_from_db()
    turncoat.refresh_from_db()
    assert job.state == Job.State.COMPLETED and delivered_wrong(job) == 0
    assert turncoat.wrong_results >= 1
    voided = Lease.objects.filter(vehicle=turncoat, verdict="voided").count()
    paid = MeterRecord.objects.filter(vehicle=turncoat, role="buyer")
    assert paid.count() == voided == Clawback.objects.filter(meter__vehicle=turncoat).count()
    assert owner_earned_minor(turncoat) <= 0
    assert (LedgerEntry.objects.aggregate(total=Sum("amount_minor"))["total"] or 0) == 0


@pytest.mark.django_db
def test_without_a_car_of_another_owner_the_platform_checks_and_the_job_completes(market, make_job):
    job = make_job(docs=24)
    car = VehicleFactory(policy__reserve_price_micros=0)
    work({car.pk: honest})
    job.refresh_from_db()
    car.refresh_from_db()
    assert job.state == Job.State.COMPLETED and delivered_wrong(job) == 0
    assert car.checks_passed >= verification_probation() and car.suspended_at is None
    assert Lease.objects.filter(vehicle=car, verdict="right").count() >= verification_probation()


def verification_probation():
    from django.conf import settings
    return settings.VERIFY_PROBATION


@pytest.mark.django_db
def test_rows_of_a_closed_job_from_a_car_caught_later_are_corrected_and_the_buyer_told_and_refunded(market, make_job):
    """The promise for rows already delivered: a car that cheats unchecked on a job that completes, and is caught
    later on another job, has those rows replaced by the platform's own, the buyer told (job.results_corrected)
    and refunded; its earnings for them are taken back."""
    from marketplace.models import BuyerWebhookEvent, WebhookEndpoint

    turncoat = VehicleFactory(policy__reserve_price_micros=0)
    Vehicle.objects.filter(pk=turncoat.pk).update(results_streak=10**6)  # trusted: almost never checked
    market.VERIFY_REPLICATION_FLOOR, market.CANARY_SHARE = 0.0, 0.0
    first = make_job(docs=40)
    WebhookEndpoint.objects.create(organisation=first.organisation, url="https://buyer.example/hook", secret="whsec_x")
    work({turncoat.pk: cheat("negate")})
    first.refresh_from_db()
    assert first.state == Job.State.COMPLETED and delivered_wrong(first) == first.units_total  # got away with it
    balance_before = LedgerEntry.objects.filter(account__organisation=first.organisation,
                                                account__kind="buyer").aggregate(t=Sum("amount_minor"))["t"]

    market.VERIFY_REPLICATION_FLOOR = 1.0  # now every result of it is checked: the next one catches it
    honest_car = VehicleFactory(policy__reserve_price_micros=0)
    second = make_job(docs=8)
    work({turncoat.pk: cheat("negate"), honest_car.pk: honest})
    second.refresh_from_db()
    turncoat.refresh_from_db()
    assert turncoat.wrong_results >= 1 and second.state == Job.State.COMPLETED and delivered_wrong(second) == 0

    assert delivered_wrong(first) == 0  # every row of the closed job is the platform's own now
    assert not WorkUnit.objects.filter(job=first, verify=WorkUnit.Verify.ARBITER).exists()
    corrected = BuyerWebhookEvent.objects.filter(job=first, type="job.results_corrected")
    assert corrected.count() == first.units_total
    voided = Clawback.objects.filter(meter__job=first)
    assert voided.count() == first.units_total
    balance_after = LedgerEntry.objects.filter(account__organisation=first.organisation,
                                               account__kind="buyer").aggregate(t=Sum("amount_minor"))["t"]
    # The refund is what the owner's and the platform's shares give back, in whole cents through their carries
    # (here sub-cent units: the exact amounts are the meters' charges, which the clawbacks return).
    refund = LedgerEntry.objects.filter(transaction__kind="clawback", account__kind="buyer",
                                        transaction__job=first).aggregate(t=Sum("amount_minor"))["t"] or 0
    assert balance_after - balance_before == refund >= 0
    assert sum(c.meter.charge_femto for c in voided) == first.meter_records.filter(role="buyer").aggregate(
        t=Sum("charge_femto"))["t"] > 0
    assert owner_earned_minor(turncoat) <= 0
    assert (LedgerEntry.objects.aggregate(total=Sum("amount_minor"))["total"] or 0) == 0


@pytest.mark.django_db
def test_a_replica_no_other_owner_takes_in_time_goes_to_the_platform_but_never_one_a_car_holds(market, make_job):
    from datetime import timedelta

    from django.utils import timezone

    # Given a new car's results waiting for a car of another owner to replicate them,
    make_job(docs=32)
    first, other = VehicleFactory(policy__reserve_price_micros=0), VehicleFactory(policy__reserve_price_micros=0)
    flows.auction_tick()
    units = []
    for _ in range(2):  # (a new car holds one lease at a time)
        (unit,), _ = flows.units_lease(vehicle_id=first.pk, max_units=1)
        assert flows.unit_complete(vehicle_id=first.pk, unit_id=unit.pk, epoch=unit.lease_epoch,
                                   result=honest([d["text"] for d in unit.inputs]))[0]
        units.append(unit)
    waiting = WorkUnit.objects.filter(pk__in=[u.pk for u in units])
    assert set(waiting.values_list("verify", "state")) == {(WorkUnit.Verify.REPLICA, WorkUnit.State.QUEUED)}
    # and the other owner's car holding one of them,
    taken, _ = flows.units_lease(vehicle_id=other.pk, max_units=1)
    assert [u.pk for u in taken] == [units[0].pk]
    # when both have waited longer than REPLICA_WAIT_S and the sweep runs,
    waiting.update(verify_since=timezone.now() - timedelta(seconds=market.REPLICA_WAIT_S + 1))
    assert fleet_sweep() == [units[1].pk]
    # then only the one no car holds goes to the platform; the held one stays the other car's replica, and its
    # result settles it.
    assert WorkUnit.objects.get(pk=units[1].pk).verify == WorkUnit.Verify.ARBITER
    held = WorkUnit.objects.get(pk=units[0].pk)
    assert (held.verify, held.state, held.leased_to_id) == (WorkUnit.Verify.REPLICA, WorkUnit.State.LEASED, other.pk)
    assert flows.unit_complete(vehicle_id=other.pk, unit_id=held.pk, epoch=taken[0].lease_epoch,
                               result=honest([d["text"] for d in held.inputs]))[0]
    assert set(Lease.objects.filter(unit=held).values_list("verdict", flat=True)) == {Lease.Verdict.AGREED}


def fleet_sweep() -> list[int]:
    from django.utils import timezone

    from fleet import services as fleet
    return fleet.units_verify_overdue(now=timezone.now())


@pytest.mark.django_db
def test_a_finished_batchs_output_file_is_rewritten_with_the_rows_corrected_after_its_car_was_caught(market, buyer,
                                                                                                     make_job):
    """A batch's output file is written once its job closes; rows corrected later (docs/verification.md,
    "Delivery") must reach the file too, not only the job's results: a buyer of a batch reads the file."""
    from marketplace import services
    from marketplace.models import Batch, BatchFile
    from tests.marketplace.test_data_retention import batch_for, request_line

    turncoat = VehicleFactory(policy__reserve_price_micros=0)
    Vehicle.objects.filter(pk=turncoat.pk).update(results_streak=10**6)
    market.VERIFY_REPLICATION_FLOOR, market.CANARY_SHARE = 0.0, 0.0
    texts = [f"Batch request {i} about the harbour's tides and the ferry timetable." for i in range(12)]
    batch = batch_for(buyer, [request_line(f"r{i}", text) for i, text in enumerate(texts)])
    work({turncoat.pk: cheat("negate")})
    assert flows.batches_finalize() == 1
    batch = Batch.objects.get(pk=batch.pk)
    file_id = batch.output_file_id

    def output_vectors():
        lines = [json.loads(line) for line in BatchFile.objects.get(public_id=file_id).content.splitlines()]
        assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(12)]
        return np.array([line["response"]["body"]["data"][0]["embedding"] for line in lines], dtype="<f4")

    truth = _embed(texts)
    assert not verification.results_agree(encode_embeddings(output_vectors()), encode_embeddings(truth),
                                           precision="int8")  # the cheat was written into the file

    market.VERIFY_REPLICATION_FLOOR = 1.0  # caught on its next job
    make_job(docs=8)
    work({turncoat.pk: cheat("negate"), VehicleFactory(policy__reserve_price_micros=0).pk: honest})
    assert delivered_wrong(batch.job) == 0
    # The same file now holds the platform's rows, for the same requests.
    assert verification.results_agree(encode_embeddings(output_vectors()), encode_embeddings(truth),
                                      precision="int8")
    assert Batch.objects.get(pk=batch.pk).output_file_id == file_id
