"""
A tiny Django project that enqueues from a view, in the view's own
database transaction (see L{tests.test_webapps}).  The database is the
SQLite file named by C{$SNQ_WEBAPP_DB}, the one snq's queue lives in
(C{$SNQ_CONFIG}).
"""

import os

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
ROOT_URLCONF = "tests.webapps.djangosite.urls"
INSTALLED_APPS = []
MIDDLEWARE = []
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ["SNQ_WEBAPP_DB"]}}
USE_TZ = True
