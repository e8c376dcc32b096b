from django.core.management.base import BaseCommand, CommandError

from billing.reconcile import reconciliation_run


class Command(BaseCommand):
    help = ("Compare the ledger with itself and with Stripe's objects (payment intents, refunds, transfers, "
            "reversals, connected accounts) and report every difference; exits 1 if there is any, or if the run "
            "could not finish. Every run is stored (admin and operator page: reconciliation history).")

    def handle(self, *args, **options):
        run = reconciliation_run()
        if run.error:
            raise CommandError(f"reconciliation run {run.pk} could not finish: {run.error}")
        for d in run.differences:
            self.stdout.write(f"{d['subject']}: {d['what']}: ours={d['ours']!r} other={d['stripe']!r}")
        if run.differences:
            raise CommandError(f"{len(run.differences)} difference(s) between the ledger and Stripe "
                               f"(reconciliation run {run.pk})")
        self.stdout.write(self.style.SUCCESS(f"No differences: the ledger agrees with Stripe (reconciliation run {run.pk})."))
