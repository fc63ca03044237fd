"""
The manual's examples of L{snq.client} (docs/producer.rst shows what lies
between the "begin" and "end" lines), run by L{tests.examples.test_producer}.
"""

from datetime import UTC, datetime, timedelta


def basics(config_path):
    # -- begin basics --
    from snq.client import Producer

    # One per process, made once (at import, say): threads share it, and a
    # forked worker makes connections of its own.
    producer = Producer.from_config(config_path)

    item_id = producer.enqueue("webhook", {"url": "https://example.org/hook",
                                           "body": {"event": "follow"}})
    producer.enqueue("webhook", {"event": "like"}, site="example", priority=5)
    producer.enqueue("digest", {"user": 42}, delay=timedelta(hours=1))
    producer.enqueue("digest", {"user": 42},
                     run_at=datetime(2031, 1, 1, 8, 0, tzinfo=UTC))
    ids = producer.enqueue_many("webhook", [{"n": 1}, {"n": 2}, {"n": 3}])
    # -- end basics --
    return [item_id, *ids]


def errors(producer, fallback):
    # -- begin errors --
    from snq.client import EnqueueError

    try:
        producer.enqueue("webhook", {"event": "follow"})
    except EnqueueError as e:
        # The queue did not take it (e.__cause__ is the driver's exception):
        # keep it elsewhere, or fail the request.
        fallback(e)
    # -- end errors --


def dbApi(producer, dsn):
    # -- begin psycopg --
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO post (body) VALUES (%s)", ["hello"])
        producer.enqueue("notify", {"post": "hello"}, connection=conn)
    # Leaving the block commits both, or, after an exception, neither.
    # -- end psycopg --


def sqlalchemy(producer, url):
    # -- begin sqlalchemy --
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    engine = create_engine(url)
    with Session(engine) as session, session.begin():
        session.execute(text("INSERT INTO post (body) VALUES (:body)"),
                        {"body": "hello"})
        producer.enqueue("notify", {"post": "hello"}, connection=session)
    # -- end sqlalchemy --
    engine.dispose()
