from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from billing.errors import BillingError
from billing.money import MINOR_EXPONENT, format_minor, major_to_minor
from billing.selectors import buyer_balance_minor
from billing.services import balance_grant
from marketplace.models import Organisation


class Command(BaseCommand):
    help = ("Grant an organisation credit from the platform (trial or goodwill; booked against the platform's "
            "grants account, no money moves at Stripe).")

    def add_arguments(self, parser):
        parser.add_argument("organisation", help="The organisation's slug, or the email of one of its members.")
        parser.add_argument("amount", help="In major units, e.g. 25.00.")
        parser.add_argument("--note", required=True, help="Why, for the ledger and the buyer's statement.")
        parser.add_argument("--reference", help="A unique reference, so running the command again grants once.")

    def handle(self, organisation, amount, note, reference, **options):
        organisation_row = (Organisation.objects.filter(slug=organisation).first()
                            or Organisation.objects.filter(members__email__iexact=organisation).first())
        if organisation_row is None:
            raise CommandError(f"No organisation with the slug or a member with the email {organisation!r}.")
        currency = settings.CURRENCY
        try:
            minor = major_to_minor(Decimal(amount), currency)
        except (InvalidOperation, ValueError):
            minor = None
        if minor is None or minor <= 0:
            raise CommandError(f"{amount!r} is not a positive amount of {currency.upper()} with at most "
                               f"{MINOR_EXPONENT[currency.lower()]} decimals.")
        try:
            balance_grant(organisation=organisation_row, amount_minor=minor, note=note,
                          reference=reference and f"grant:{reference}")
        except BillingError as error:
            raise CommandError(error.message)
        balance = buyer_balance_minor(organisation=organisation_row)
        self.stdout.write(f"Granted {format_minor(minor, currency)} to {organisation_row.name}; "
                          f"balance now {format_minor(balance, currency)}.")
