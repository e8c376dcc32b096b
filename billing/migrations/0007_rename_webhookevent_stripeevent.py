from django.db import migrations


class Migration(migrations.Migration):
    """Stripe's inbound events get a name of their own (the buyer's outbound ones are marketplace's)."""

    dependencies = [("billing", "0006_invariants_in_the_database")]

    operations = [migrations.RenameModel(old_name="WebhookEvent", new_name="StripeEvent")]
