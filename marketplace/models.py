from django.conf import settings
from django.contrib.auth.models import AbstractUser, BaseUserManager
from django.db import models
from django.utils import timezone

from billing.money import price_micros_for_per_units, price_per_units_micros
from fleet import workloads
from fleet.workloads.base import PriceUnit

PRECISION_CHOICES = [("int8", "INT8"), ("fp16", "FP16"), ("fp32", "FP32")]
class UserManager(BaseUserManager):
    use_in_migrations = True

    def _create(self, email, password, **extra):
        if not email:
            raise ValueError("An email address is required")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_user(self, email, password=None, **extra):
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create(email, password, **extra)

    def create_superuser(self, email, password=None, **extra):
        extra.update(is_staff=True, is_superuser=True, role=User.Role.OPERATOR)
        return self._create(email, password, **extra)


class Organisation(models.Model):
    """A buyer organisation: it owns jobs and API keys, and its members act for it."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return self.name


class User(AbstractUser):
    class Role(models.TextChoices):
        OWNER = "owner", "Car owner"
        BUYER = "buyer", "Buyer"
        OPERATOR = "operator", "Operator"

    username = None
    email = models.EmailField(unique=True)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.OWNER)
    organisation = models.ForeignKey(
        Organisation, null=True, blank=True, on_delete=models.PROTECT, related_name="members",
        help_text="Buyers only: the organisation they act for.",
    )
    electricity_price_micros_per_kwh = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Owners only: what their electricity costs, micro-units per kWh, for "
                                         "the estimate of their cars' energy cost on the earnings page.")

    USERNAME_FIELD = "email"
    REQUIRED_FIELDS = []
    objects = UserManager()

    def __str__(self):
        return self.email

    @property
    def is_buyer(self) -> bool:
        return self.role == self.Role.BUYER and self.organisation_id is not None

    @property
    def is_owner(self) -> bool:
        return self.role == self.Role.OWNER

    @property
    def is_operator(self) -> bool:
        return self.role == self.Role.OPERATOR or self.is_superuser


class ApiKey(models.Model):
    """An API key: a buyer organisation's, or (without organisation) a car owner's own. The secret is shown
    once; only its SHA-256 is stored. Requests with it act as ``created_by``."""

    organisation = models.ForeignKey(Organisation, null=True, blank=True, on_delete=models.CASCADE,
                                     related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, unique=True, help_text="Public part, shown in listings.")
    key_hash = models.CharField(max_length=64, help_text="SHA-256 hex of the whole key.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    default_bid_per_million_tokens_micros = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The bid of the OpenAI-compatible batches made with this key that name none, in "
                                         "micro-units per million tokens of their model; null: the documented default.")

    class Meta:
        verbose_name = "API key"

    def __str__(self):
        return f"{self.prefix}… ({self.name})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class AIModel(models.Model):
    """A model buyers can run. ``runtime`` names the car agent's implementation (fleet.agent.models)."""

    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    task = models.CharField(max_length=32, default="embedding",
                            help_text="The workload it serves (fleet.workloads; docs/workloads.md).")
    runtime = models.CharField(max_length=64)
    precisions = models.JSONField(default=list, help_text='Precisions the model runs at, e.g. ["int8", "fp32"].')
    dims = models.PositiveIntegerField(help_text="Output vector size.")
    max_tokens = models.PositiveIntegerField()
    ops_per_token = models.PositiveBigIntegerField(
        help_text="Operations per cost unit of its workload (a token; a page for OCR): the basis of every price.")
    licence = models.CharField(max_length=64, blank=True)
    size_bytes = models.PositiveBigIntegerField(default=0, help_text="What a car downloads to run it.")
    active = models.BooleanField(default=True)

    class Meta:
        verbose_name = "AI model"
        ordering = ["slug"]

    @property
    def price_unit(self) -> PriceUnit:
        """What its buyers' prices are per (a million tokens, a thousand pages): its workload's."""
        return workloads.get(self.task).price_unit

    def price_for_buyer(self, price_micros: int) -> int:
        """A price per compute unit (what the auction clears) as micro-units per its price unit."""
        return price_per_units_micros(price_micros=price_micros, ops_per_unit=self.ops_per_token,
                                      per=self.price_unit.per)

    def price_from_buyer(self, per_unit_micros: int) -> int:
        """A price typed per its price unit, as micro-units per compute unit (rounded down)."""
        return price_micros_for_per_units(per_units_micros=per_unit_micros, ops_per_unit=self.ops_per_token,
                                          per=self.price_unit.per)

    def __str__(self):
        return self.name


class Job(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        CANCELLED = "cancelled", "Cancelled"
        EXPIRED = "expired", "Expired"

    OPEN_STATES = (State.QUEUED, State.RUNNING)

    organisation = models.ForeignKey(Organisation, on_delete=models.PROTECT, related_name="jobs")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    ai_model = models.ForeignKey(AIModel, on_delete=models.PROTECT, related_name="jobs")
    precision = models.CharField(max_length=8, choices=PRECISION_CHOICES)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED, db_index=True)
    max_price_micros = models.PositiveBigIntegerField(
        help_text="Sealed bid: the most the buyer pays per compute unit (10^15 ops), in micro-units."
    )
    currency = models.CharField(max_length=3, default="usd")
    deadline = models.DateTimeField()
    params = models.JSONField(default=dict, blank=True,
                              help_text="The workload's parameters, the same for every document (a classifier's labels).")
    budget_cap_minor = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The most the job may spend, in the currency's minor units (cents); "
                                         "null: no cap beyond the bid. The auction bids only for work it can still pay.")
    docs_total = models.PositiveIntegerField(default=0)
    tokens_total = models.PositiveBigIntegerField(default=0)
    mops_total = models.PositiveBigIntegerField(default=0, help_text="Work in mega-ops (10^6 operations).")
    units_total = models.PositiveIntegerField(default=0)
    units_done = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Retention (docs/api.md, "Data retention and deletion"): the buyer's documents and results are deleted when
    # it ends, or at once on request; the row, its counts, its meter records and the ledger stay.
    data_retention_s = models.PositiveIntegerField(
        null=True, blank=True, help_text="How long after the job finishes its documents and results are kept, in "
                                         "seconds; null: BATCH_FILE_RETENTION_S (30 days, as a batch file's).")
    data_expires_at = models.DateTimeField(
        null=True, blank=True, db_index=True,
        help_text="When the jobs-data-expire sweep deletes its documents and results; set when the job finishes.")
    data_deleted_at = models.DateTimeField(null=True, blank=True,
                                           help_text="When its documents and results were deleted.")

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state", "precision"])]
        constraints = [models.CheckConstraint(condition=models.Q(units_done__lte=models.F("units_total")),
                                              name="job_units_done_at_most_total")]

    def __str__(self):
        return f"Job {self.pk} ({self.ai_model.slug}, {self.precision})"

    @property
    def progress_pct(self) -> int:
        return int(100 * self.units_done / self.units_total) if self.units_total else 0

    @property
    def data_deleted(self) -> bool:
        return self.data_deleted_at is not None


class JobEvent(models.Model):
    """A job's history as its buyer sees it: state changes, bid and budget changes, in order."""

    class Kind(models.TextChoices):
        CREATED = "created", "Created"
        STARTED = "started", "Started"
        BID_CHANGED = "bid_changed", "Bid changed"
        BUDGET_CHANGED = "budget_changed", "Budget changed"
        BUDGET_REACHED = "budget_reached", "Budget reached"
        COMPLETED = "completed", "Completed"
        CANCELLED = "cancelled", "Cancelled"
        EXPIRED = "expired", "Expired"
        DATA_DELETED = "data_deleted", "Data deleted"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    at = models.DateTimeField(default=timezone.now)
    detail = models.CharField(max_length=300, blank=True)
    by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self):
        return f"{self.job} {self.kind} at {self.at:%H:%M:%S}"


class AuctionRound(models.Model):
    """One cleared round of one market (precision class). ``journal`` holds the sealed inputs exactly as
    cleared, so replaying it through the clearing function reproduces the outcome."""

    market = models.CharField(max_length=8, choices=PRECISION_CHOICES)
    cleared_at = models.DateTimeField(db_index=True)
    interval_s = models.FloatField()
    clearing_price_micros = models.PositiveBigIntegerField(null=True, blank=True, help_text="Null when nothing traded.")
    offered_mops = models.PositiveBigIntegerField(default=0)
    demanded_mops = models.PositiveBigIntegerField(default=0)
    sold_mops = models.PositiveBigIntegerField(default=0)
    journal = models.JSONField(default=dict)

    class Meta:
        ordering = ["-cleared_at"]
        get_latest_by = "cleared_at"

    def __str__(self):
        return f"{self.market} round at {self.cleared_at:%H:%M:%S}"


class Allocation(models.Model):
    """Capacity of one car sold to one job in one round, at the round's clearing price."""

    round = models.ForeignKey(AuctionRound, on_delete=models.CASCADE, related_name="allocations")
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="allocations")
    vehicle = models.ForeignKey("fleet.Vehicle", on_delete=models.CASCADE, related_name="allocations")
    price_micros = models.PositiveBigIntegerField()
    mops = models.PositiveBigIntegerField()
    remaining_mops = models.BigIntegerField(help_text="Drawn down as the dispatcher leases units.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["round", "job", "vehicle"], name="allocation_once_per_round")]


class IdempotencyKey(models.Model):
    """A POST's ``Idempotency-Key`` and the first response to it, replayed to repeats of the same request for
    ``settings.IDEMPOTENCY_TTL_S`` (24 hours). While the first request runs, ``response_status`` is null and
    ``lock`` names that request: its work and its response commit in one transaction, so a key is either
    completed with its work done, or not completed with none of it done (see marketplace.idempotency)."""

    scope = models.CharField(max_length=32, help_text="Whose key it is: org:<id> (a buyer organisation) or user:<id>.")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of the method, path and body.")
    path = models.CharField(max_length=500)
    lock = models.CharField(max_length=32, help_text="Token of the request that holds the key while it runs.")
    locked_at = models.DateTimeField()
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(db_index=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "key"], name="idempotency_key_once_per_scope")]

    def __str__(self):
        return f"{self.scope} {self.key}"


WEBHOOK_EVENT_TYPES = [
    ("job.completed", "every unit of the job is done: the results are ready"),
    ("job.failed", "the job ended without completing: it expired at its deadline, or was cancelled"),
    ("job.progress", "more of the job is done (at most once a minute per job)"),
    ("job.results_corrected", "rows of a finished job were corrected: their car was caught cheating after they "
                              "were delivered (data.rows: the documents' ids)"),
    ("batch.completed", "an OpenAI-compatible batch completed: its output file is ready"),
    ("batch.failed", "an OpenAI-compatible batch failed: its file had no valid request, or too many"),
    ("batch.expired", "an OpenAI-compatible batch expired: what finished is in its output file"),
    ("batch.cancelled", "an OpenAI-compatible batch was cancelled: what finished is in its output file"),
]


class WebhookEndpoint(models.Model):
    """Where a buyer organisation receives signed events. The secret signs every delivery; the API shows it
    once, when the endpoint is created."""

    organisation = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.URLField(max_length=2000)
    secret = models.CharField(max_length=64, help_text="Signing secret (whsec_...).")
    events = models.JSONField(default=list, help_text="Event types delivered; empty: all of them.")
    description = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    disabled_at = models.DateTimeField(null=True, blank=True, help_text="Deleted by the buyer: no more deliveries.")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.url

    def receives(self, event_type: str) -> bool:
        return not self.events or event_type in self.events


class BuyerWebhookEvent(models.Model):
    """One event for an organisation, with its body exactly as every attempt sends it. Recorded in the
    transaction that changed the job, so an event exists if and only if its change committed."""

    public_id = models.CharField(max_length=40, unique=True, help_text="evt_...: receivers de-duplicate by it.")
    organisation = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="webhook_events")
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.CASCADE, related_name="webhook_events")
    type = models.CharField(max_length=32, choices=[(t, t) for t, _ in WEBHOOK_EVENT_TYPES])
    body = models.TextField(help_text="The JSON body as delivered: {id, type, created, data}.")
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["job", "type", "created_at"])]
        constraints = [models.UniqueConstraint(fields=["job", "type"], name="webhook_job_ends_once",
                                               condition=models.Q(type__in=["job.completed", "job.failed"]))]

    def __str__(self):
        return f"{self.public_id} {self.type}"


class WebhookDelivery(models.Model):
    """One event to one endpoint: the delivery log. Attempts are made by a periodic sweep (the database, not
    a Celery countdown, says when the next one is due), with exponential backoff between them."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed (gave up)"

    event = models.ForeignKey(BuyerWebhookEvent, on_delete=models.CASCADE, related_name="deliveries")
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True, help_text="Null once delivered or given up.")
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Null: no HTTP answer.")
    last_error = models.CharField(max_length=500, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state", "next_attempt_at"])]
        constraints = [models.UniqueConstraint(fields=["event", "endpoint"], name="webhook_delivery_once")]

    def __str__(self):
        return f"{self.event.public_id} to {self.endpoint.url}"


class BatchFile(models.Model):
    """A file of the OpenAI-compatible Files API (``/v1/files``): a buyer's upload of batch requests
    (purpose ``batch``), or what a batch produced (``batch_output``: its output or its error file). The content
    is kept in the database, so that deleting the row deletes the data (docs/api.md, "OpenAI-compatible
    batches")."""

    class Purpose(models.TextChoices):
        BATCH = "batch", "Batch input"
        BATCH_OUTPUT = "batch_output", "Batch output"

    public_id = models.CharField(max_length=40, unique=True, help_text="file-...: the id the API shows.")
    organisation = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="batch_files")
    purpose = models.CharField(max_length=16, choices=Purpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField(help_text="Size of the content in bytes.")
    content = models.BinaryField()
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True,
                                      help_text="When the batch-files-expire sweep deletes it (and it stops being shown).")

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self):
        return f"{self.public_id} ({self.filename})"


class Batch(models.Model):
    """An OpenAI-compatible batch (``/v1/batches``): a file of requests run as one of our jobs. Its status is
    derived from its job's state (marketplace.selectors.batch_status); ``finalized_at`` is set once its output
    and error files are written."""

    public_id = models.CharField(max_length=40, unique=True, help_text="batch_...: the id the API shows.")
    organisation = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="batches")
    job = models.OneToOneField(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="batch",
                               help_text="Null when the file had no valid request (the batch failed).")
    input_file = models.ForeignKey(BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="batches")
    input_file_public_id = models.CharField(max_length=40, help_text="Kept when the input file is deleted.")
    endpoint = models.CharField(max_length=64)
    completion_window = models.CharField(max_length=8)
    metadata = models.JSONField(null=True, blank=True)
    fingerprint = models.CharField(max_length=64, db_index=True,
                                   help_text="SHA-256 of the create request: a repeat within a short window is the same batch.")
    model_slug = models.CharField(max_length=64, blank=True)
    request_options = models.JSONField(default=list, help_text="Per valid request, in order: how its answer is written "
                                                                "(its workload's options, e.g. encoding_format).")
    requests = models.JSONField(default=list, help_text='The valid requests in input order: [[custom_id, line, inputs]].')
    class BidSource(models.TextChoices):
        REQUEST = "request", "Named by the batch request"
        API_KEY = "api_key", "The API key's default bid"
        DEFAULT = "default", "The suggested price, capped by the balance"

    bid_source = models.CharField(max_length=8, choices=BidSource.choices, default=BidSource.REQUEST,
                                  help_text="Where the job's bid came from (marketplace.flows.batches.batch_create).")
    line_errors = models.JSONField(default=list, help_text="The lines refused at validation: {line, custom_id, code, message}.")
    errors = models.JSONField(null=True, blank=True, help_text="Why the whole batch failed: [{code, message, line, param}].")
    request_total = models.PositiveIntegerField(default=0)
    request_completed = models.PositiveIntegerField(default=0)
    request_failed = models.PositiveIntegerField(default=0)
    usage_tokens = models.PositiveBigIntegerField(default=0, help_text="Input tokens of the delivered requests.")
    output_expires_after_s = models.PositiveIntegerField(
        null=True, blank=True, help_text="output_expires_after: its output and error files expire this many seconds "
                                         "after they are written; null: BATCH_FILE_RETENTION_S.")
    output_file_id = models.CharField(max_length=40, blank=True)
    error_file_id = models.CharField(max_length=40, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    finalized_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name_plural = "batches"

    def __str__(self):
        return self.public_id
