#!/usr/bin/env python
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    from django.conf import settings
    from django.core.management import execute_from_command_line

    # The embedded profile's SQLite file lives in VAR_DIR; the command line (not the settings) creates it.
    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)

    execute_from_command_line(sys.argv)
