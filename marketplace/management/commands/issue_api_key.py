from django.core.management.base import BaseCommand, CommandError

from marketplace import services
from marketplace.models import User


class Command(BaseCommand):
    help = ("Print a new API key on the last line: for a buyer's organisation (the account is created as a buyer "
            "if it does not exist) or for an existing car owner's own cars.")

    def add_arguments(self, parser):
        parser.add_argument("email")
        parser.add_argument("--name", default="cli", help="A label for the key.")

    def handle(self, email, name, **options):
        user = User.objects.filter(email__iexact=email).first()
        if user is None:
            user = services.buyer_create(email=email)
            self.stderr.write(f"Created buyer {user.email} in organisation {user.organisation.name!r}.")
        elif not (user.is_buyer or user.is_owner):
            raise CommandError(f"{email} is neither a buyer nor a car owner ({user.role}).")
        # A buyer's key acts for their organisation; an owner's key for their cars (the owner API).
        _, secret = services.api_key_create(organisation=user.organisation if user.is_buyer else None, name=name,
                                            created_by=user)
        self.stdout.write(secret)
