"""One settings module for both runtime profiles, driven by environment variables.

Embedded profile (no variables set): SQLite, in-memory channel layer, Celery tasks executed in process and
an in-process periodic scheduler. Services profile: set ``DATABASE_URL`` (PostgreSQL) and ``REDIS_URL``
(Celery broker and channels-redis layer). Production also sets ``DJANGO_DEBUG=false`` and
``DJANGO_SECRET_KEY``; a missing production secret fails at start. With ``DJANGO_DEBUG=false`` the HTTPS
settings (redirect, HSTS, secure cookies) default to their secure values; the embedded profile serves plain
http. Importing this module creates nothing: whoever opens a file under ``VAR_DIR`` makes the directory.
"""

from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

# The embedded profile's files (SQLite database, the local Stripe peer's log) and production's collected static
# files. Not created here: `run_embedded` makes it, the test suite makes its test database's directory
# (tests/conftest.py), collectstatic makes STATIC_ROOT.
VAR_DIR = Path(env("VAR_DIR", default=str(BASE_DIR / "var")))

DEBUG = env.bool("DJANGO_DEBUG", default=True)
if DEBUG:
    SECRET_KEY = env("DJANGO_SECRET_KEY", default="embedded-profile-not-secret-" + "x" * 32)
else:
    SECRET_KEY = env("DJANGO_SECRET_KEY")  # raises ImproperlyConfigured when missing
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "testserver", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# --- HTTPS ----------------------------------------------------------------------------------------
# Production is served only over HTTPS, through a TLS-terminating proxy (docs/deploy.md): with DEBUG off these
# default to the secure values and `manage.py check --deploy` has nothing to say. The embedded profile (`make
# run`, the tests and the processes they start) serves plain http on loopback: DEBUG on, all of them off.
# The header in which the proxy says the client's request came over https. The proxy must set it on every
# request, replacing whatever the client sent. Empty: trust no header (a proxy on the same host can rely on
# uvicorn's --proxy-headers instead, which sets the scheme from it for 127.0.0.1 only).
_PROXY_SSL_HEADER = env("DJANGO_SECURE_PROXY_SSL_HEADER", default="" if DEBUG else "X-Forwarded-Proto")
SECURE_PROXY_SSL_HEADER = ("HTTP_" + _PROXY_SSL_HEADER.upper().replace("-", "_"), "https") if _PROXY_SSL_HEADER else None
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
# Load balancers and orchestrators probe a process directly, over http and without the proxy's header: the
# health check answers them rather than redirecting them to an https address the process does not serve.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 365 * 24 * 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
# Preloading is an opt-in: asking browsers to ship the domain as HTTPS-only binds every subdomain of the whole
# registered domain and takes months to undo, a decision about the domain rather than this deployment. Left
# off, check --deploy's reminder of it (W021) is silenced as a choice made here; set true to preload.
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=False)
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
SESSION_COOKIE_SECURE = env.bool("DJANGO_SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("DJANGO_CSRF_COOKIE_SECURE", default=not DEBUG)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and Redoc assets, served by us (no CDN)
    "allauth",
    "allauth.account",
    "channels",
    "marketplace",
    "fleet",
    "billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
]

ROOT_URLCONF = "marketplace.urls"
ASGI_APPLICATION = "marketplace.asgi.application"
WSGI_APPLICATION = "marketplace.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several threads (ASGI consumers, the scheduler) write: WAL lets readers go on, IMMEDIATE transactions
    # take the write lock up front so two writers queue instead of failing on a lock upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["TEST"] = {"NAME": env("SQLITE_TEST_NAME", default=str(VAR_DIR / "test.sqlite3"))}
else:
    # Persistent connections: a gateway process authenticating thousands of reconnecting cars connected twice
    # as fast with them (each car costs a few round trips, each otherwise on a new connection). HTTP requests
    # close theirs when they finish (marketplace.apps): Django's ASGI handler runs each request in a thread of
    # its own, so a request's persistent connection was left open behind it, and the 1,000-car benchmark's API
    # polling ran PostgreSQL out of connections. (A psycopg_pool pool would share open connections with the
    # children of a fork: Celery's prefork workers, the leasing benchmark; two processes on one socket.)
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, channels, Celery ----------------------------------------------------------------------
REDIS_URL = env("REDIS_URL", default="")
# Per-channel queue size of the redis layer. channels-redis drops messages beyond it; our control messages
# are repaired from the database on the car's next heartbeat (see fleet.gateway.session), never assumed delivered.
CHANNEL_CAPACITY = env.int("CHANNEL_CAPACITY", default=2000)
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 times socket reads out after 5 s by default, exactly channels-redis's blocking-pop
                # timeout: every idle consumer would die every 5 s. Reads wait longer than the pop; the pool
                # is large because redis-py's async pool raises instead of waiting when it runs out.
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30, "max_connections": 5000}],
                "capacity": CHANNEL_CAPACITY,
                "expiry": 30,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "marketplace.channel_layers.AmortisedInMemoryChannelLayer",
                                  "CONFIG": {"capacity": CHANNEL_CAPACITY}}}

CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL  # embedded profile: tasks run in process
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_TIME_LIMIT = 120
CELERY_TASK_SOFT_TIME_LIMIT = 100
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# --- Marketplace rules ----------------------------------------------------------------------------
AUCTION_INTERVAL_S = env.float("AUCTION_INTERVAL_S", default=2.0)
LEASE_SWEEP_INTERVAL_S = env.float("LEASE_SWEEP_INTERVAL_S", default=2.0)
LEASE_TTL_S = env.int("LEASE_TTL_S", default=30)
# Heartbeats extend a lease by LEASE_TTL_S, up to its deadline: LEASE_LIFETIME_FACTOR (fleet.dispatch) times
# the car's own time for its work, plus one TTL, and at most LEASE_MAX_LIFETIME_S. A lease that runs out is a
# strike against its car: its in-flight limit halves per strike it still carries; one is forgiven every
# LEASE_STRIKE_FORGIVE_S after the last.
LEASE_MAX_LIFETIME_S = env.int("LEASE_MAX_LIFETIME_S", default=300)
LEASE_STRIKE_FORGIVE_S = env.int("LEASE_STRIKE_FORGIVE_S", default=30)
HEARTBEAT_INTERVAL_S = env.int("HEARTBEAT_INTERVAL_S", default=5)
VEHICLE_STALE_AFTER_S = env.int("VEHICLE_STALE_AFTER_S", default=20)
# The operator's cap on any car's in-flight leases; each car's own limit comes from its speed and link
# (fleet.dispatch). At most fleet.protocol.MAX_INFLIGHT.
MAX_INFLIGHT_PER_CAR = min(32, env.int("MAX_INFLIGHT_PER_CAR", default=32))
# A gateway process writes telemetry that changes no decision, and heartbeats, in one batch this often; it
# re-reads each car's policy and usage at least this often (and at once when the owner changes the policy).
GATEWAY_FLUSH_S = env.float("GATEWAY_FLUSH_S", default=1.0)
GATEWAY_VIEW_REFRESH_S = env.float("GATEWAY_VIEW_REFRESH_S", default=60.0)
# A gateway closes a connection that sends no hello this long after its handshake (4004), and a car that sends
# nothing at all this long after its hello (4005): four of its heartbeats, or of the agent's 5 s telemetry.
GATEWAY_HELLO_TIMEOUT_S = env.float("GATEWAY_HELLO_TIMEOUT_S", default=10.0)
GATEWAY_IDLE_TIMEOUT_S = env.float("GATEWAY_IDLE_TIMEOUT_S", default=4.0 * max(HEARTBEAT_INTERVAL_S, 5))
DOCS_PER_UNIT = env.int("DOCS_PER_UNIT", default=8)
# Verification (docs/verification.md; the rules live in fleet.verification). A car's first VERIFY_PROBATION
# results are all computed again by a car of another owner, and after that PROBATION / (results since its
# last wrong one + 1) of them, never fewer than VERIFY_REPLICATION_FLOOR. A share of every job's units are
# canaries, computed by the platform too; a replica that no car of another owner takes within REPLICA_WAIT_S
# is computed by the platform, as is a unit whose two results disagree.
VERIFY_PROBATION = env.int("VERIFY_PROBATION", default=3)
VERIFY_REPLICATION_FLOOR = env.float("VERIFY_REPLICATION_FLOOR", default=0.04)
CANARY_SHARE = env.float("CANARY_SHARE", default=0.01)
REPLICA_WAIT_S = env.float("REPLICA_WAIT_S", default=60.0)
VERIFY_SWEEP_INTERVAL_S = env.float("VERIFY_SWEEP_INTERVAL_S", default=10.0)
# Capacity is proven, not declared (docs/vehicle-protocol.md, "Capacity is measured"). A car's rate per precision
# is what it delivered: accepted mega-ops over the time it was working on them, weighted exp(-t / window) by
# working seconds t since (so it follows about the last CAPACITY_RATE_WINDOW_S of work), over at least
# CAPACITY_MIN_BUSY_S. A car that delivered nothing there yet gets CAPACITY_PROVISIONAL_MOPS_PER_S (a fifth of
# what one CPU core delivers with all-MiniLM-L6-v2; far below any car computer's nominal figure). The hello's
# claim only ever lowers either. Only cars that sent work.request (or delivered a result) within
# CAPACITY_ASKED_WITHIN_S are offered.
CAPACITY_RATE_WINDOW_S = env.float("CAPACITY_RATE_WINDOW_S", default=60.0)
CAPACITY_MIN_BUSY_S = env.float("CAPACITY_MIN_BUSY_S", default=1.0)
CAPACITY_PROVISIONAL_MOPS_PER_S = env.int("CAPACITY_PROVISIONAL_MOPS_PER_S", default=5_000)
CAPACITY_ASKED_WITHIN_S = env.float("CAPACITY_ASKED_WITHIN_S", default=max(2 * AUCTION_INTERVAL_S, 6.0))
# Capacity allocated and left unused is taken back: once a tick is CAPACITY_RECLAIM_AFTER_S old, a car with no
# allocation left may lease from another car's remainder if that car holds none of its units. A car told
# "no_work" asks again after half of it.
CAPACITY_RECLAIM_AFTER_S = env.float("CAPACITY_RECLAIM_AFTER_S", default=max(1.5, AUCTION_INTERVAL_S / 4))
# A car's standing: of the capacity it won in the last CAPACITY_STANDING_WINDOW_S (jobs still open), the share
# it used itself. Below CAPACITY_USED_SHARE_OK its offer shrinks in proportion, to no less than
# CAPACITY_WASTE_FLOOR of its rate (so that it can earn its standing back).
CAPACITY_STANDING_WINDOW_S = env.float("CAPACITY_STANDING_WINDOW_S", default=10 * AUCTION_INTERVAL_S)
CAPACITY_USED_SHARE_OK = env.float("CAPACITY_USED_SHARE_OK", default=0.8)
CAPACITY_WASTE_FLOOR = env.float("CAPACITY_WASTE_FLOOR", default=0.1)
# Hardware class check: a car that worked at least HARDWARE_CHECK_MIN_BUSY_S at a precision and delivers less
# than HARDWARE_MISMATCH_SHARE of the median of its class's cars there (at least HARDWARE_CLASS_MIN_CARS of them
# with that much work) is flagged. 0.7: an HW3 (144 TOPS) sold as an HW4 (245) delivers about 0.59 of an HW4.
# Each gateway process checks the cars that asked for work at most every HARDWARE_CHECK_INTERVAL_S.
HARDWARE_CHECK_MIN_BUSY_S = env.float("HARDWARE_CHECK_MIN_BUSY_S", default=30.0)
HARDWARE_MISMATCH_SHARE = env.float("HARDWARE_MISMATCH_SHARE", default=0.7)
HARDWARE_CLASS_MIN_CARS = env.int("HARDWARE_CLASS_MIN_CARS", default=3)
HARDWARE_CHECK_INTERVAL_S = env.float("HARDWARE_CHECK_INTERVAL_S", default=60.0)
PLATFORM_FEE_BPS = env.int("PLATFORM_FEE_BPS", default=1500)  # 15.00 % of each charge goes to the platform
CURRENCY = env("CURRENCY", default="usd")
MAX_UPLOAD_LINE_BYTES = env.int("MAX_UPLOAD_LINE_BYTES", default=64 * 1024)
MAX_ERRORS_REPORTED = 50
# OpenAI-compatible batches (docs/api.md): the same POST /v1/batches (same file and parameters) within this many
# seconds returns the batch it made, since the OpenAI client sends no Idempotency-Key; its files are written by
# the batches-finalize sweep every BATCH_FINALIZE_INTERVAL_S (and when a client reads the batch).
BATCH_REPEAT_WINDOW_S = env.int("BATCH_REPEAT_WINDOW_S", default=600)
BATCH_FINALIZE_INTERVAL_S = env.float("BATCH_FINALIZE_INTERVAL_S", default=10.0)
# Buyers' batch files (inputs, outputs, errors) are deleted this long after they were made unless the upload's
# expires_after or the batch's output_expires_after says otherwise (OpenAI's default: 30 days), by the
# batch-files-expire sweep. A job's documents and results are kept as long after the job finishes (a batch's
# job: its output_expires_after), then deleted by the jobs-data-expire sweep (docs/api.md, "Data retention and
# deletion"): one retention setting for both.
BATCH_FILE_RETENTION_S = env.int("BATCH_FILE_RETENTION_S", default=30 * 24 * 3600)
BATCH_FILE_SWEEP_INTERVAL_S = env.float("BATCH_FILE_SWEEP_INTERVAL_S", default=300.0)

# Periodic work, called by Celery beat in the services profile and by the in-process scheduler in the
# embedded profile (marketplace.scheduler): one list, two drivers.
CELERY_BEAT_SCHEDULE = {
    "auction-tick": {"task": "marketplace.tasks.auction_tick", "schedule": timedelta(seconds=AUCTION_INTERVAL_S)},
    "leases-sweep": {"task": "fleet.tasks.leases_sweep", "schedule": timedelta(seconds=LEASE_SWEEP_INTERVAL_S)},
    "units-verify-sweep": {"task": "marketplace.tasks.units_verify_sweep",
                           "schedule": timedelta(seconds=VERIFY_SWEEP_INTERVAL_S)},
    "batches-finalize": {"task": "marketplace.tasks.batches_finalize",
                         "schedule": timedelta(seconds=BATCH_FINALIZE_INTERVAL_S)},
    "batch-files-expire": {"task": "marketplace.tasks.batch_files_expire",
                           "schedule": timedelta(seconds=BATCH_FILE_SWEEP_INTERVAL_S)},
    "jobs-data-expire": {"task": "marketplace.tasks.jobs_data_expire",
                         "schedule": timedelta(seconds=BATCH_FILE_SWEEP_INTERVAL_S)},
}

# --- Accounts -------------------------------------------------------------------------------------
AUTH_USER_MODEL = "marketplace.User"
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = env("ACCOUNT_EMAIL_VERIFICATION", default="optional")
ACCOUNT_SIGNUP_FORM_CLASS = "marketplace.forms.SignupForm"
LOGIN_REDIRECT_URL = "home"
ACCOUNT_LOGOUT_REDIRECT_URL = "home"
EMAIL_BACKEND = env("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="marketplace@localhost")
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

# --- REST API -------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # DRF's parsers, with JSON nested too deeply for the interpreter answered 400 rather than 500.
    "DEFAULT_PARSER_CLASSES": ["marketplace.core.parsers.JSONParser", "rest_framework.parsers.FormParser",
                               "rest_framework.parsers.MultiPartParser"],
    "EXCEPTION_HANDLER": "marketplace.api_errors.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_THROTTLE_CLASSES": ["marketplace.authentication.ApiKeyRateThrottle"],
    # Failed pairing attempts (fleet.api.PairApi), per client address and per code prefix: an agent pairs once.
    "DEFAULT_THROTTLE_RATES": {"api_key": env("API_THROTTLE_RATE", default="600/min"),
                               "pairing_client": env("PAIRING_THROTTLE_RATE_CLIENT", default="10/min"),
                               "pairing_code": env("PAIRING_THROTTLE_RATE_CODE", default="5/min")},
    # A client's address is REMOTE_ADDR alone; a trusted proxy's X-Forwarded-For reaches it through uvicorn's
    # --proxy-headers (--forwarded-allow-ips), never a header the client could write itself.
    "NUM_PROXIES": 0,
}
# Throttle counts: shared by every process through Redis in the services profile; one process's memory in
# the embedded profile (where there is one process).
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL,
                          "KEY_PREFIX": "cache"}}
IDEMPOTENCY_TTL_S = 24 * 3600  # an Idempotency-Key is remembered this long after its first request
IDEMPOTENCY_LOCK_S = env.int("IDEMPOTENCY_LOCK_S", default=600)  # an unfinished first request is presumed dead after it
# Outbound webhooks (marketplace.buyer_webhooks): attempts at WEBHOOK_RETRY_BASE_S x 2^n after each failure.
WEBHOOK_TIMEOUT_S = env.float("WEBHOOK_TIMEOUT_S", default=5.0)
WEBHOOK_MAX_ATTEMPTS = env.int("WEBHOOK_MAX_ATTEMPTS", default=10)
WEBHOOK_RETRY_BASE_S = env.float("WEBHOOK_RETRY_BASE_S", default=60.0)
WEBHOOK_PROGRESS_INTERVAL_S = 60  # job.progress at most once a minute per job
WEBHOOK_SWEEP_INTERVAL_S = env.float("WEBHOOK_SWEEP_INTERVAL_S", default=2.0)
# Buyers' endpoints must be public https URLs, except on the embedded profile (a laptop, loopback receivers).
WEBHOOK_ALLOW_PRIVATE_URLS = env.bool("WEBHOOK_ALLOW_PRIVATE_URLS", default=DEBUG)
CELERY_BEAT_SCHEDULE |= {
    "webhooks-send": {"task": "marketplace.tasks.webhooks_send", "schedule": timedelta(seconds=WEBHOOK_SWEEP_INTERVAL_S)},
    "idempotency-purge": {"task": "marketplace.tasks.idempotency_keys_purge", "schedule": timedelta(hours=1)},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Fleet inference marketplace API",
    "DESCRIPTION": "Buy inference capacity from parked electric cars. Authenticate with `Authorization: Bearer <api key>`. "
                   "The guide: docs/api.md.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/api/v1",  # operations are tagged by what follows: jobs, rounds, webhooks, ...
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {"PrecisionEnum": "marketplace.models.PRECISION_CHOICES"},
}

# --- Static, i18n ---------------------------------------------------------------------------------
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Production runs collectstatic (which creates STATIC_ROOT) and WhiteNoise serves what it collected. The embedded
# profile serves the files where they are (finders) and has no STATIC_ROOT, so WhiteNoise looks for no
# directory that was never collected (it warns about a missing one).
STATIC_ROOT = None if DEBUG else VAR_DIR / "static"
WHITENOISE_USE_FINDERS = DEBUG
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"client_faults": {"()": "marketplace.log_filters.ClientFaultFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}, "celery.app.trace": {"level": "WARNING"},
                # a client's bad frame (not UTF-8) is a warning, not an exception with a traceback
                "uvicorn.error": {"filters": ["client_faults"]}},
}

# --- Stripe (billing) --------------------------------------------------------------------------------
# The embedded profile and the tests talk to the local Stripe peer (localstripe plus the Connect routes of
# billing.localpeer) on loopback, with its test keys; production sets STRIPE_API_BASE=https://api.stripe.com and
# real keys, whose absence then fails at start (env() raises ImproperlyConfigured).
STRIPE_API_BASE = env("STRIPE_API_BASE", default="http://127.0.0.1:8420")
STRIPE_IS_LOCAL_PEER = urlsplit(STRIPE_API_BASE).hostname in ("127.0.0.1", "localhost", "::1")
if STRIPE_IS_LOCAL_PEER:
    STRIPE_SECRET_KEY = env("STRIPE_SECRET_KEY", default="sk_test_local_peer")
    STRIPE_WEBHOOK_SECRET = env("STRIPE_WEBHOOK_SECRET", default="whsec_local_peer")
else:
    STRIPE_SECRET_KEY = env("STRIPE_SECRET_KEY")
    STRIPE_WEBHOOK_SECRET = env("STRIPE_WEBHOOK_SECRET")
# The buyer's browser saves cards with Stripe.js under this key (not needed on the local peer, whose test
# cards the billing page sends through the server).
STRIPE_PUBLISHABLE_KEY = env("STRIPE_PUBLISHABLE_KEY", default="")
STRIPE_WEBHOOK_TOLERANCE_S = 300  # a webhook signed more than this before or after now is refused
STRIPE_TIMEOUT_S = env.float("STRIPE_TIMEOUT_S", default=20.0)
STRIPE_MIN_PAYOUT_MINOR = env.int("STRIPE_MIN_PAYOUT_MINOR", default=1000)  # owners are paid from 10.00 up
STRIPE_PAYOUT_HOLDBACK_DAYS = env.int("STRIPE_PAYOUT_HOLDBACK_DAYS", default=7)  # younger earnings wait
# Settlement: the task runs hourly; a run happens once per ISO week (the run's key), so a missed hour or
# a restart delays nothing and a second run in the same week does nothing.
CELERY_BEAT_SCHEDULE |= {
    "billing-settlement": {"task": "billing.tasks.settlement_run", "schedule": timedelta(hours=1)},
    "billing-pending-retry": {"task": "billing.tasks.pending_retry", "schedule": timedelta(minutes=5)},
}
LOGGING["loggers"]["stripe"] = {"level": "WARNING"}  # stripe-python logs every request at INFO
