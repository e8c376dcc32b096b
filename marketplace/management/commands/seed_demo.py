from django.core.management.base import BaseCommand

from marketplace import services
from marketplace.demo import BUYER, demo_job_top_up
from marketplace.models import User

PASSWORD = "fleet-demo-2026"
OPERATOR, OWNER = "operator@demo.local", "owner@demo.local"


class Command(BaseCommand):
    help = "Create the demo accounts (idempotent), a demo job if the buyer has none open, and print the logins."

    def add_arguments(self, parser):
        parser.add_argument("--docs", type=int, default=400, help="Documents in each demo job (0 for none).")

    def handle(self, docs, **options):
        if not User.objects.filter(email=OPERATOR).exists():
            User.objects.create_superuser(email=OPERATOR, password=PASSWORD)
        buyer = User.objects.filter(email=BUYER).first() or services.buyer_create(
            email=BUYER, password=PASSWORD, organisation_name="Demo AI Labs")
        if not User.objects.filter(email=OWNER).exists():
            User.objects.create_user(email=OWNER, password=PASSWORD, role=User.Role.OWNER)
        _, key = services.api_key_create(organisation=buyer.organisation, name="demo", created_by=buyer)
        for job in demo_job_top_up(docs=docs) if docs else []:
            self.stdout.write(f"Demo job {job.pk} ({job.ai_model.name}): {job.docs_total} standard-library docstrings, "
                              f"{job.units_total} units.")
        self.stdout.write(
            "\nDemo logins (password for all: %s)\n  operator (admin):  %s\n  buyer:             %s\n"
            "  car owner:         %s\nBuyer API key (new one each start):\n  %s\n" % (PASSWORD, OPERATOR, BUYER, OWNER, key))
