"""The demo buyer of `make run` (marketplace.demo): one open job of every workload, so a newcomer sees each work."""

import pytest

from fleet import workloads
from marketplace import demo, services
from marketplace.models import Job

pytestmark = pytest.mark.django_db


def test_the_demo_buyer_keeps_one_open_job_of_every_workload():
    services.buyer_create(email=demo.BUYER, password="x-demo-pass-1", organisation_name="Demo AI Labs")
    made = demo.demo_job_top_up(docs=16)
    assert sorted(job.ai_model.task for job in made) == sorted(workloads.WORKLOADS)
    classifier = next(job for job in made if job.ai_model.task == "classification")
    assert len(classifier.params["labels"]) == 8 and classifier.docs_total == 16
    assert demo.demo_job_top_up(docs=16) == []  # while they are open, nothing more
    Job.objects.filter(pk=classifier.pk).update(state=Job.State.COMPLETED)
    assert [job.ai_model.task for job in demo.demo_job_top_up(docs=16)] == ["classification"]
