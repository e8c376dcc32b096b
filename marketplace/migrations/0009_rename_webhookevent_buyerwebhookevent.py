from django.db import migrations


class Migration(migrations.Migration):
    """The buyer's outbound webhook events get a name of their own (billing's inbound ones are Stripe's)."""

    dependencies = [("marketplace", "0008_invariants_in_the_database")]

    operations = [
        migrations.RenameModel(old_name="WebhookEvent", new_name="BuyerWebhookEvent"),
        migrations.RenameIndex(model_name="buyerwebhookevent", new_name="marketplace_job_id_c70170_idx",
                               old_name="marketplace_job_id_3f56dd_idx"),
    ]
