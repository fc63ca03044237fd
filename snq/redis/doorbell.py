# -*- test-case-name: tests.test_redis -*-
"""
Waking an idle worker: a blocking command per consumed list, each on a
connection of its own, rings when a producer pushes.
"""

from twisted.internet import defer
from twisted.logger import Logger

from snq.redis.connection import CONNECTION_ERRORS, RedisConnection

#: Seconds a blocking wait lasts before it is renewed (and the connection
#: proven alive).
BLOCK = 5.0


class Doorbell:
    """
    Blocks on one ready list, on a connection of its own, and rings when
    the list has something.  The blocking command moves the list's last
    element onto its own end, so the list is unchanged: the claim (a Lua
    script, with a lease) is what takes items.

    Armed by the manager when a claim found nothing; rings once, then waits
    to be armed again.  While its connection is down it rings after each
    reconnection attempt, so the manager polls at the reconnect's pace.
    """

    log = Logger()

    def __init__(self, connection: RedisConnection, key: str, ring):
        self.connection = connection
        self.key = key
        self.ring = ring
        self.armed = False
        self.stopped = True
        self._later = None

    def start(self):
        self.stopped = False
        self.connection.start()

    def stop(self):
        self.stopped = True
        if self._later is not None and self._later.active():
            self._later.cancel()
        return self.connection.stop()

    def arm(self):
        if self.armed or self.stopped:
            return
        self.armed = True
        self._wait()

    def _wait(self):
        d = self.connection.blocking(BLOCK, "BLMOVE", self.key, self.key,
                                     "RIGHT", "RIGHT", BLOCK)
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, frame):
        if self.stopped:
            return
        if frame is None:
            self._wait()
            return
        self.armed = False
        self.ring()

    def _failed(self, failure):
        self.armed = False
        if self.stopped:
            return
        if failure.check(*CONNECTION_ERRORS):
            self.log.info("waiting on {key} interrupted: {why}", key=self.key,
                          why=failure.getErrorMessage())
            self.ring()
        else:
            # Not the connection (a key of the wrong type, say): ringing at
            # once would spin; the claim will say what is wrong meanwhile.
            self.log.failure("waiting on {key} failed", failure, key=self.key)
            self._later = self.connection.reactor.callLater(BLOCK, self.ring)


class Listener:
    """The doorbells of the lists a worker consumes, as L{Queue.listen} gives."""

    log = Logger()

    def __init__(self, keys: list[str], makeDoorbell):
        self.makeDoorbell = makeDoorbell
        self.doorbells: list[Doorbell] = []
        self.follow(keys)

    def follow(self, keys: list[str]) -> defer.Deferred:
        """
        A doorbell on each of C{keys}: kept where there was one, new ones
        started, those on lists no longer consumed stopped.
        """
        have = {bell.key: bell for bell in self.doorbells}
        self.doorbells = [have.pop(key) if key in have else self.makeDoorbell(key)
                          for key in keys]
        for bell in self.doorbells:
            if bell.stopped:
                bell.start()
        d = defer.gatherResults([bell.stop() for bell in have.values()],
                                consumeErrors=True)
        return d.addErrback(lambda f: self.log.failure("stopping doorbells", f))

    def arm(self):
        for bell in self.doorbells:
            bell.arm()

    def stopListening(self):
        d = defer.gatherResults([bell.stop() for bell in self.doorbells],
                                consumeErrors=True)
        # Never fails: the manager still has to let its items finish.
        return d.addErrback(lambda f: self.log.failure("stopping doorbells", f))
