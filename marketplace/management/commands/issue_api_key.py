from django.core.management.base import BaseCommand, CommandError

from marketplace import services
from marketplace.models import User


class Command(BaseCommand):
    help = "Create a buyer account if needed and print a new API key for its organisation (on the last line)."

    def add_arguments(self, parser):
        parser.add_argument("email")
        parser.add_argument("--name", default="cli", help="A label for the key.")

    def handle(self, email, name, **options):
        user = User.objects.filter(email__iexact=email).first()
        if user is None:
            user = services.buyer_create(email=email)
            self.stderr.write(f"Created buyer {user.email} in organisation {user.organisation.name!r}.")
        elif not user.is_buyer:
            raise CommandError(f"{email} exists and is not a buyer ({user.role}).")
        _, secret = services.api_key_create(organisation=user.organisation, name=name, created_by=user)
        self.stdout.write(secret)
