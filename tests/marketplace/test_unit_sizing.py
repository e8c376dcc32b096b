"""Units fit the vehicle protocol's messages (fleet.protocol.UNIT_TEXT_BYTES, MAX_TEXT_CHARS): long documents are
cut into smaller units and over-long texts shortened, so that every unit.assign a car gets is one it accepts
(before, eight long documents made a message the agent refused, and the unit went round until its job expired)."""

import io
import json
from datetime import timedelta

import pytest
from django.utils import timezone

from fleet import protocol
from fleet.models import WorkUnit
from fleet.workloads.base import fit_text
from marketplace import flows, selectors, services
from marketplace.models import Batch

pytestmark = pytest.mark.django_db


def assign_of(unit: WorkUnit) -> protocol.Message:
    """The unit.assign the gateway would send for ``unit``, through the protocol's own encoder and decoder (what
    the car does with it)."""
    message = protocol.UnitAssign(unit_id=unit.pk, epoch=1, runtime="all-minilm-l6-v2", precision="int8",
                                  texts=[doc["text"] for doc in unit.inputs], lease_ttl_s=30)
    return protocol.parse(protocol.decode(protocol.encode(protocol.dump(message))), protocol.SERVER_MESSAGES)


def test_long_documents_are_cut_into_units_every_car_accepts(buyer):
    long_ascii = "word " * 2_500  # 12,500 characters: eight of them would be 100 KB
    cjk = "数据" * 10_000  # 20,000 characters, each six bytes as the encoder escapes it
    rows = [{"id": f"a{i}", "text": long_ascii} for i in range(8)] + [{"id": "cjk", "text": cjk}]  # a 60 KB line
    rows += [{"id": f"s{i}", "text": "short"} for i in range(10)]
    job = flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
                           precision="int8", max_price_micros=2_000_000, deadline=timezone.now() + timedelta(hours=1),
                           inputs=io.BytesIO(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)))
    units = list(WorkUnit.objects.filter(job=job).order_by("seq"))
    # every unit's message is accepted by the protocol, and none is larger than the message limit,
    for unit in units:
        assert assign_of(unit).unit_id == unit.pk
    # the documents keep their order and ids, short ones still eight to a unit,
    assert [doc["id"] for unit in units for doc in unit.inputs] == [r["id"] for r in rows]
    assert len(units[-1].inputs) <= 8 and any(len(unit.inputs) == 8 for unit in units)
    assert max(len(unit.inputs) for unit in units if unit.inputs[0]["text"] == long_ascii) < 8
    # and the over-long text was shortened to what one message carries (the model reads 256 tokens of it).
    cut = next(doc["text"] for unit in units for doc in unit.inputs if doc["id"] == "cjk")
    assert cjk.startswith(cut) and len(json.dumps(cut)) <= protocol.UNIT_TEXT_BYTES < len(json.dumps(cjk))
    assert fit_text("short") == "short" and len(fit_text("x" * 20_000)) == protocol.MAX_TEXT_CHARS


def test_a_batch_counts_its_finished_requests_over_units_of_any_size(buyer):
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": "all-minilm-l6-v2", "input": ("word " * 3_000) if i % 2 == 0 else "short"}}
            for i in range(12)]
    content = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    file = services.batch_file_create(organisation=buyer.organisation, user=buyer, upload=io.BytesIO(content),
                                      filename="r.jsonl", purpose="batch")
    batch = flows.batch_create(organisation=buyer.organisation, user=buyer, input_file_id=file.public_id,
                               endpoint="/v1/embeddings", completion_window="24h")
    units = list(WorkUnit.objects.filter(job=batch.job).order_by("seq"))
    assert len(units) > 2
    # Done: the first unit only; the requests whose documents it holds are finished, and no other.
    WorkUnit.objects.filter(pk=units[0].pk).update(state=WorkUnit.State.DONE)
    batch = Batch.objects.get(pk=batch.pk)
    assert selectors.batch_public(batch)["request_counts"]["completed"] == len(units[0].inputs)
    WorkUnit.objects.filter(job=batch.job).update(state=WorkUnit.State.DONE)
    assert selectors.batch_public(batch)["request_counts"]["completed"] == 12
