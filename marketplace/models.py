from django.conf import settings
from django.contrib.auth.models import AbstractUser, BaseUserManager
from django.db import models

PRECISION_CHOICES = [("int8", "INT8"), ("fp16", "FP16"), ("fp32", "FP32")]
# Workload categories: a model's task, and what an owner consents to. (code, name, in plain words)
WORKLOAD_CATEGORIES = [
    ("embedding", "Embeddings", "turning text into vectors for search and recommendations"),
    ("classification", "Classification", "sorting texts into labels, such as spam or not spam"),
    ("text-generation", "Text generation", "writing text, the heaviest kind of work"),
]


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
    task = models.CharField(max_length=32, default="embedding", choices=[(c, n) for c, n, _ in WORKLOAD_CATEGORIES])
    runtime = models.CharField(max_length=64)
    precisions = models.JSONField(default=list, help_text='Precisions the model runs at, e.g. ["int8", "fp32"].')
    dims = models.PositiveIntegerField(help_text="Output vector size.")
    max_tokens = models.PositiveIntegerField()
    ops_per_token = models.PositiveBigIntegerField(help_text="Operations per input token (cost basis).")
    active = models.BooleanField(default=True)

    class Meta:
        verbose_name = "AI model"
        ordering = ["slug"]

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
    docs_total = models.PositiveIntegerField(default=0)
    tokens_total = models.PositiveBigIntegerField(default=0)
    mops_total = models.PositiveBigIntegerField(default=0, help_text="Work in mega-ops (10^6 operations).")
    units_total = models.PositiveIntegerField(default=0)
    units_done = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state", "precision"])]

    def __str__(self):
        return f"Job {self.pk} ({self.ai_model.slug}, {self.precision})"

    @property
    def progress_pct(self) -> int:
        return int(100 * self.units_done / self.units_total) if self.units_total else 0


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
