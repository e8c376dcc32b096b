"""docs/workloads.md's worked example of adding a workload, run as written there: its two modules (read from
the page's code blocks) registered as the packages would find them, the catalogue synced, and a job of it
computed by a car through the real flows."""

import importlib.util
import io
import json
import re
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from fleet import workloads
from fleet.agent import workloads as agent_workloads
from fleet.agent.models import get_runner
from marketplace import flows, selectors, services
from marketplace.models import AIModel, Job
from tests.factories import VehicleFactory
from tests.fleet.test_verification import market, work  # noqa: F401 (the fixture)

DOC = Path(__file__).resolve().parent.parent / "docs" / "workloads.md"


def example_modules() -> tuple[str, str]:
    text = DOC.read_text()
    server = re.search(r"`fleet/workloads/sentiment.py`:\n\n```python\n(.*?)```", text, re.S).group(1)
    agent = re.search(r"`fleet/agent/workloads/sentiment.py`:\n\n```python\n(.*?)```", text, re.S).group(1)
    return server, agent


def load(name: str, source: str, monkeypatch):
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    exec(compile(source, name, "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.mark.django_db
def test_the_worked_example_adds_a_workload_that_cars_compute(monkeypatch, buyer, market):
    server_source, agent_source = example_modules()
    server = load("fleet.workloads.sentiment", server_source, monkeypatch)
    agent = load("fleet.agent.workloads.sentiment", agent_source, monkeypatch)
    monkeypatch.setitem(workloads.WORKLOADS, server.WORKLOAD.task, server.WORKLOAD)
    monkeypatch.setitem(agent_workloads.RUNTIMES, agent.TASK, agent.run)
    services.catalogue_sync()
    row = AIModel.objects.get(slug="minilm-sentiment")
    assert row.task == "sentiment" and ("sentiment", "Sentiment", server.WORKLOAD.consent) in workloads.categories()
    reviews = ["Absolutely love it, works perfectly and I would buy it again.",
               "Broke after two days, terrible quality, I want my money back."]
    job = flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="minilm-sentiment",
                           precision="int8", max_price_micros=2_000_000, deadline=timezone.now() + timedelta(hours=1),
                           inputs=io.BytesIO(b"".join(json.dumps({"text": r}).encode() + b"\n" for r in reviews)))
    embed = get_runner("all-minilm-l6-v2", "int8").embed

    def car(texts, unit):
        return agent_workloads.compute("sentiment", texts, unit.job.params, embed)

    work({VehicleFactory(policy__reserve_price_micros=0).pk: car, VehicleFactory(policy__reserve_price_micros=0).pk: car})
    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED
    assert [json.loads(line)["label"] for line in selectors.job_results_lines(job=job)] == ["positive", "negative"]
