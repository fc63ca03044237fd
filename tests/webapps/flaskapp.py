"""A Flask app that enqueues from a view (see L{tests.test_webapps})."""

from flask import Flask, jsonify, request

from snq.client import Producer

app = Flask(__name__)
producer = Producer.from_config()


@app.post("/notify")
def notify():
    return jsonify(id=producer.enqueue("stamp", request.get_json(),
                                       site=request.args.get("site", "default")))
