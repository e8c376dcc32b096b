from django.core.management.base import BaseCommand, CommandError

from billing.reconcile import reconcile


class Command(BaseCommand):
    help = ("Compare the ledger with itself and with Stripe's objects (payment intents, refunds, transfers, "
            "reversals, connected accounts) and report every difference; exits 1 if there is any.")

    def handle(self, *args, **options):
        differences = reconcile()
        for difference in differences:
            self.stdout.write(str(difference))
        if differences:
            raise CommandError(f"{len(differences)} difference(s) between the ledger and Stripe")
        self.stdout.write(self.style.SUCCESS("No differences: the ledger agrees with Stripe."))
