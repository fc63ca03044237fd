"""Saving a signup and queueing its welcome: one transaction."""

from django.db import connection, transaction
from django.http import JsonResponse

from snq.client import Producer

# One per process, made at import: gunicorn's forked workers may share it.
producer = Producer.from_config()


def signup(request):
    name = request.POST["name"]
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO signup (name) VALUES (%s)", [name])
        itemId = producer.enqueue("stamp", {"welcome": name},
                                  connection=connection)
        if name == "mallory":
            raise ValueError("refused after the enqueue: both are undone")
    return JsonResponse({"id": itemId})
