"""
Requests to the Django project or the Flask app through their test
clients, in a process of its own; prints JSON: the answers and whether
Twisted got imported.

    python -m tests.webapps.run django|flask
"""

import json
import sys


def django():
    import os

    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.webapps.djangosite.settings"
    import django
    from django.test import Client

    django.setup()
    client = Client(raise_request_exception=False)
    answers = [client.post("/signup", {"name": name}) for name in
               ("alice", "mallory")]
    return [(a.status_code, a.json() if a.status_code == 200 else None)
            for a in answers]


def flask():
    from tests.webapps.flaskapp import app

    client = app.test_client()
    answer = client.post("/notify?site=default", json={"event": "follow"})
    return [(answer.status_code, answer.get_json())]


if __name__ == "__main__":
    answers = {"django": django, "flask": flask}[sys.argv[1]]()
    print(json.dumps({"answers": answers, "twisted": "twisted" in sys.modules}))
