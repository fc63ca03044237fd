"""
What a web application does with L{snq.client}, in a process of its own
(nothing of Twisted is imported before): enqueue one item, a batch, a
delayed one, from several threads at once, and from a forked child (as
gunicorn's workers are) on the producer its parent used before and after.
Prints JSON: the ids by kind, a time the delayed item must not start
before, and whether Twisted got imported.

    python -m tests.client_script CONFIG TRANSPORT
"""

import json
import os
import sys
import threading
import time

from snq.client import Producer


def main(configPath, transport):
    producer = Producer.from_config(configPath)
    ids = {"single": [producer.enqueue(transport, {"n": 1})],
           "many": producer.enqueue_many(transport, [{"n": n} for n in range(50)])}
    notBefore = time.time() + 1.0
    ids["delayed"] = [producer.enqueue(transport, {"late": True}, delay=1.0)]

    threaded, lock = [], threading.Lock()

    def work():
        for n in range(20):
            itemId = producer.enqueue(transport, {"thread": n})
            with lock:
                threaded.append(itemId)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ids["threads"] = threaded

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        status = 1
        try:
            os.write(write, producer.enqueue(transport, {"child": True}).encode())
            # A worker that closes its producer as it exits must not close
            # (or say goodbye on) the connections its parent still uses.
            producer.close()
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    _, status = os.waitpid(pid, 0)
    ids["forked"] = [child, producer.enqueue(transport, {"parent": True})]
    producer.close()
    print(json.dumps({"ids": ids, "notBefore": notBefore, "childStatus": status,
                      "twisted": "twisted" in sys.modules}))


if __name__ == "__main__":
    main(*sys.argv[1:])
