# -*- test-case-name: tests.test_client_wire -*-
"""
What L{snq.client.Producer} writes on the wire for Redis and STOMP, and
how it reads the answers, on a fake socket: Redis's handshake, one command
per enqueue (C{LPUSH}, C{ZADD}, what the ENQUEUE script would do), replies
cut anywhere, error replies, a connection dropped while idle; STOMP's
SEND frames, one write per call, the receipts and ERROR frames.  The real
servers' runs are L{tests.test_client_servers}'.
"""

import json
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.client import EnqueueError, Producer, stomp
from snq.client.redis import _oneCommand
from snq.client.resp import ProtocolError, ReplyError, RespConnection, command
from snq.client.stomp import BrokerError, FrameReader
from snq.client.wire import Wire
from snq.item import Item
from snq.redis.address import RedisAddress


class FakeWire:
    """
    Records each write; each read gives the next chunk the test queued.
    Each write also queues the next of C{answers}, if any: what a broker
    says only once it is sent something.
    """

    def __init__(self, *chunks, answers=()):
        self.written: list[bytes] = []
        self.chunks = list(chunks)
        self.answers = list(answers)
        self.closed = False
        self.log: list[str] = []

    def write(self, data):
        if self.closed:
            raise ConnectionError("closed")
        self.written.append(data)
        self.log.append("write")
        if self.answers:
            self.chunks.append(self.answers.pop(0))

    def readable(self):
        return bool(self.chunks)

    def read(self):
        self.log.append("read")
        if not self.chunks:
            raise ConnectionError("closed by the server")
        return self.chunks.pop(0)

    def close(self):
        self.closed = True


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def parse(request: bytes) -> list[bytes]:
    """A command's arguments, from its RESP encoding (and checks it)."""
    head, _, rest = request.partition(b"\r\n")
    assert head[:1] == b"*"
    args = []
    for _ in range(int(head[1:])):
        size, _, rest = rest.partition(b"\r\n")
        assert size[:1] == b"$"
        n = int(size[1:])
        args.append(rest[:n])
        assert rest[n:n + 2] == b"\r\n"
        rest = rest[n + 2:]
    assert rest == b"", rest
    return args


class WireTests(SynchronousTestCase):
    """The socket's limits, in the kernel (C{SO_RCVTIMEO}) for plain TCP."""

    def listen(self):
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        return server

    def test_noAnswerInTime(self):
        server = self.listen()
        wire = Wire("127.0.0.1", server.getsockname()[1], 0.2)
        self.addCleanup(wire.close)
        wire.write(b"PING\r\n")
        start = time.monotonic()
        e = self.assertRaises(TimeoutError, wire.read)
        self.assertEqual(str(e), "no answer within 0.2 s")
        self.assertLess(time.monotonic() - start, 5)
        self.assertIsNone(wire.sock.gettimeout(), "blocking: no poll per call")

    def test_closedByTheServer(self):
        server = self.listen()
        wire = Wire("127.0.0.1", server.getsockname()[1], 5)
        self.addCleanup(wire.close)
        peer, _ = server.accept()
        peer.sendall(b"+OK\r\n")
        peer.close()
        self.assertEqual(wire.read(), b"+OK\r\n")
        e = self.assertRaises(ConnectionError, wire.read)
        self.assertEqual(str(e), "closed by the server")


class CommandTests(SynchronousTestCase):
    def test_encoding(self):
        self.assertEqual(command("LPUSH", "snq:q:main", b"{}\r\n", 7),
                         b"*4\r\n$5\r\nLPUSH\r\n$10\r\nsnq:q:main\r\n"
                         b"$4\r\n{}\r\n\r\n$1\r\n7\r\n")
        self.assertEqual(command("SET", "é", ""),
                         b"*3\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n$0\r\n\r\n")


class RespConnectionTests(SynchronousTestCase):
    def connect(self, url, *chunks):
        wire = FakeWire(*chunks)
        return RespConnection(wire, RedisAddress.fromURL(url), "me"), wire

    def test_handshakeInOneWrite(self):
        """AUTH with the ACL user, SELECT, the client's name: one write."""
        _, wire = self.connect("redis://app:s%40cret@h:1/3",
                                  b"+OK\r\n+OK\r\n+O", b"K\r\n")
        self.assertEqual(wire.written, [
            command("AUTH", "app", "s@cret") + command("SELECT", 3)
            + command("CLIENT", "SETNAME", "me")])
        self.assertEqual(wire.chunks, [])

    def test_handshakeWithoutAuthOrDatabase(self):
        _, wire = self.connect("redis://h:1/0", b"+OK\r\n")
        self.assertEqual(wire.written, [command("CLIENT", "SETNAME", "me")])
        _, wire = self.connect("redis://:pw@h:1/0", b"+OK\r\n+OK\r\n")
        self.assertEqual(parse(wire.written[0].partition(b"*3")[0]),
                         [b"AUTH", b"pw"])

    def test_refusedHandshakeCloses(self):
        """The first error reply raises, once every reply is read."""
        e = self.assertRaises(
            ReplyError, self.connect, "redis://u:bad@h:1/2",
            b"-WRONGPASS invalid username-password pair\r\n-NOAUTH x\r\n",
            b"-NOAUTH y\r\n")
        self.assertEqual(str(e), "WRONGPASS invalid username-password pair")

    def test_repliesCutAnywhere(self):
        conn, wire = self.connect("redis://h:1/0", b"+OK\r\n")
        for reply, chunks in [
                (12, [b":1", b"2\r", b"\n"]),
                (b"a\r\nb", [b"$4\r\na\r", b"\nb", b"\r\n"]),
                (None, [b"$-1\r\n"]),
                ([1, [b"x", None], b"OK"],
                 [b"*3\r\n:1\r\n*2\r\n$1\r\nx\r\n$-1\r\n+OK", b"\r\n"]),
                ([], [b"*0\r\n"])]:
            wire.chunks = chunks
            self.assertEqual(conn.execute(b"PING"), reply)
            self.assertEqual(wire.chunks, [])

    def test_pipelineKeepsOrder(self):
        conn, wire = self.connect("redis://h:1/0", b"+OK\r\n")
        wire.chunks = [b":1\r\n-ERR no\r\n:3\r\n"]
        e = self.assertRaises(ReplyError, conn.pipeline, [b"A", b"B", b"C"])
        self.assertEqual(str(e), "ERR no")
        wire.chunks = [b":4\r\n"]
        self.assertEqual(conn.execute(b"D"), 4, "in step after the error")

    def test_notResp(self):
        conn, wire = self.connect("redis://h:1/0", b"+OK\r\n")
        wire.chunks = [b"HTTP/1.1 400 Bad Request\r\n"]
        self.assertRaises(ProtocolError, conn.execute, b"PING")


class RedisProducerTests(SynchronousTestCase):
    """The commands an enqueue writes: one write, one reply read, per call."""

    def setUp(self):
        self.config = snqconfig.parse({
            "queue": {"backend": "redis", "breakout": ["main/mail"]},
            "redis": {"url": "redis://127.0.0.1:1/0", "prefix": "t:"}})
        self.producer = Producer(config=self.config)
        self.addCleanup(self.producer.close)
        self.wires = [FakeWire(b"+OK\r\n")]
        self.made = 0
        self.patch(self.producer._backend, "_wire", self.newWire)

    def newWire(self):
        """The next of C{self.wires}, the server having answered the handshake."""
        if self.made == len(self.wires):
            self.wires.append(FakeWire(b"+OK\r\n"))
        self.made += 1
        return self.wires[self.made - 1]

    def reply(self, *chunks):
        """What the server says next, on the last connection (made or not yet)."""
        self.wires[-1].chunks += chunks

    def sent(self):
        """The arguments of the command sent last, the only one of its write."""
        return parse(self.wires[-1].written[-1])

    def test_oneReadyItemIsOneLpush(self):
        self.reply(b":1\r\n", b":1\r\n")
        self.producer.enqueue("log", "first")
        itemId = self.producer.enqueue("log", {"a": 1}, key="k")
        [wire] = self.wires
        self.assertEqual(len(wire.written), 3, "handshake, then one write each")
        verb, key, frame = self.sent()
        self.assertEqual((verb, key), (b"LPUSH", b"t:q:main"))
        item = Item.fromJSON(frame)
        self.assertEqual((item.id, item.transport, item.payload, item.key),
                         (itemId, "log", {"a": 1}, "k"))
        self.assertEqual(wire.chunks, [])

    def test_batchOnOneListIsOneLpush(self):
        self.reply(b":3\r\n")
        ids = self.producer.enqueue_many("log", [1, 2, 3])
        verb, key, *frames = self.sent()
        self.assertEqual((verb, key), (b"LPUSH", b"t:q:main"))
        self.assertEqual([Item.fromJSON(f).id for f in frames], ids,
                         "pushed in order, as the script pushes them")

    def test_breakoutsList(self):
        self.reply(b":1\r\n")
        self.producer.enqueue("mail", 1)
        self.assertEqual(self.sent()[:2], [b"LPUSH", b"t:q:main/mail"])

    def test_delayedIsOneZadd(self):
        self.reply(b":2\r\n")
        ids = self.producer.enqueue_many("log", [1, 2], run_at=4e9)
        verb, key, *scored = self.sent()
        self.assertEqual((verb, key), (b"ZADD", b"t:delayed:main"))
        self.assertEqual(scored[0::2], [b"4000000000.000000"] * 2)
        for itemId, member in zip(ids, scored[1::2], strict=True):
            token, _, frame = member.partition(b"\n")
            self.assertEqual(token.decode(), itemId)
            self.assertEqual(json.loads(frame)["run_at"], 4e9)

    def test_sameAsTheScript(self):
        """
        The command stores what the daemon's ENQUEUE script would, given
        the same KEYS and ARGV (the script run by Redis:
        L{tests.test_client_servers}).
        """
        keys = ["p:q:g", "p:delayed:g"]
        self.assertEqual(_oneCommand(keys, [1, "", b"a", 1, "", b"b"]),
                         command("LPUSH", "p:q:g", b"a", b"b"))
        self.assertEqual(_oneCommand(keys, [1, "5.0", b"t\na", 1, "5.0", b"u\nb"]),
                         command("ZADD", "p:delayed:g", "5.0", b"t\na", "5.0",
                                 b"u\nb"))
        self.assertRaises(ValueError, _oneCommand, keys, [1, "", b"a", 1, "5", b"b"])
        self.assertRaises(ValueError, _oneCommand, keys * 2, [1, "", b"a", 2, "", b"b"])

    def test_errorReply(self):
        """An error reply is the EnqueueError's cause; the connection is
        replaced (a new one logs in before the next)."""
        self.reply(b"-OOM command not allowed when used memory > 'maxmemory'\r\n")
        e = self.assertRaises(EnqueueError, self.producer.enqueue, "log", 1)
        self.assertIsInstance(e.__cause__, ReplyError)
        self.assertIn("cannot enqueue on redis://127.0.0.1:1/0: OOM command", str(e))
        self.wires.append(FakeWire(b"+OK\r\n:1\r\n"))
        self.producer.enqueue("log", 2)
        self.assertTrue(self.wires[0].closed)
        self.assertEqual(self.made, 2)

    def test_droppedWhileIdle(self):
        """A kept connection the server closed: the item goes on a new one."""
        self.reply(b":1\r\n")
        self.producer.enqueue("log", 1)
        self.wires.append(FakeWire(b"+OK\r\n:1\r\n"))
        self.producer.enqueue("log", 2)
        first, second = self.wires
        self.assertTrue(first.closed)
        self.assertEqual(parse(first.written[-1])[0], b"LPUSH", "tried there first")
        self.assertEqual(parse(second.written[-1])[0], b"LPUSH")
        self.assertEqual(second.chunks, [])

    def test_newConnectionFails(self):
        """Not retried: the server is there but did not answer."""
        e = self.assertRaises(EnqueueError, self.producer.enqueue, "log", 1)
        self.assertIsInstance(e.__cause__, ConnectionError)
        self.assertEqual(self.made, 1)
        self.assertTrue(self.wires[0].closed)


CONNECTED = b"CONNECTED\nversion:1.2\nserver:RabbitMQ/3.10.8\nsession:s\n\n\0\n"


def receipt(n: int) -> bytes:
    return b"RECEIPT\nreceipt-id:snq-%d\n\n\0\n" % n


class FrameReaderTests(SynchronousTestCase):
    def test_cutAnywhere(self):
        data = (b"\nRECEIPT\nreceipt-id:snq-0\n\n\0\n\n"
                b"MESSAGE\r\nfoo:a\\cb\\\\c\\n\r\nfoo:second\r\n\r\nbody\0"
                b"ERROR\ncontent-length:5\nmessage:x\n\na\0b\nc\0\n")
        for size in (1, 2, 7, len(data)):
            reader, frames = FrameReader(), []
            for at in range(0, len(data), size):
                reader.add(data[at:at + size])
                frames += reader.frames()
            self.assertEqual(frames, [
                ("RECEIPT", {"receipt-id": "snq-0"}, b""),
                ("MESSAGE", {"foo": "a:b\\c\n"}, b"body"),
                ("ERROR", {"content-length": "5", "message": "x"}, b"a\0b\nc")],
                size)


class StompProducerTests(SynchronousTestCase):
    """What a STOMP enqueue writes, and when it returns."""

    def setUp(self):
        self.config = snqconfig.parse({
            "queue": {"backend": "stomp", "basename": "/queue/t/"},
            "stomp": {"servers": ["tcp://127.0.0.1:1"], "connect_timeout": 5}})
        self.producer = Producer(config=self.config)
        self.wires = []
        self.patch(self.producer._backend, "_wire", self.newWire)

    def newWire(self, url):
        self.wires.append(FakeWire(answers=[CONNECTED, *self.answers]))
        return self.wires[-1]

    def test_oneSendOneWrite(self):
        """The frame in one write, the call back once its receipt came."""
        self.answers = [receipt(0), receipt(1)]
        self.producer.enqueue("log", {"a": 1})
        itemId = self.producer.enqueue("log", {"a": 2}, key="k")
        [wire] = self.wires
        self.assertTrue(wire.written[0].startswith(b"CONNECT\n"))
        self.assertEqual(len(wire.written), 3)
        head, _, rest = wire.written[2].partition(b"\n\n")
        body, nul = rest[:-1], rest[-1:]
        self.assertEqual(head.split(b"\n"), [
            b"SEND", b"destination:/queue/t%2Fmain", b"persistent:true",
            b"content-type:application/json", b"receipt:snq-1",
            b"content-length:%d" % len(body)])
        self.assertEqual(nul, b"\0")
        self.assertEqual(Item.fromJSON(body).id, itemId)
        self.assertEqual(wire.chunks, [])

    def test_batchOneWrite(self):
        self.answers = [receipt(0) + receipt(2) + receipt(1)]
        ids = self.producer.enqueue_many("log", [1, 2, 3])
        [wire] = self.wires
        frames = wire.written[1].split(b"\0")
        self.assertEqual(frames[-1], b"")
        self.assertEqual([Item.fromJSON(f.partition(b"\n\n")[2]).id
                          for f in frames[:-1]], ids)

    def test_windows(self):
        """
        A big batch goes out a window at a time, the receipts that came
        meanwhile taken in between, so that neither side's buffers fill up.
        """
        self.patch(stomp, "WINDOW", 2)
        self.answers = [receipt(0) + receipt(1), receipt(2), receipt(3) + receipt(4)]
        ids = self.producer.enqueue_many("log", range(5))
        [wire] = self.wires
        self.assertEqual([w.count(b"\0") for w in wire.written[1:]], [2, 2, 1])
        self.assertEqual(wire.log[2:], ["write", "read"] * 3)
        self.assertEqual(wire.chunks, [])
        self.assertEqual(len(ids), 5)

    def test_waitsForEveryReceipt(self):
        """A receipt short: no answer, so EnqueueError."""
        self.answers = [receipt(0) + receipt(1)]
        e = self.assertRaises(EnqueueError, self.producer.enqueue_many,
                              "log", [1, 2, 3])
        self.assertIsInstance(e.__cause__, ConnectionError)

    def test_delayed(self):
        """To the delay queue a retry would use, with its TTL and way back."""
        self.answers = [receipt(0)]
        self.producer.enqueue("log", 1, delay=30)
        head = self.wires[0].written[1].partition(b"\n\n")[0].split(b"\n")
        self.assertEqual(head[1][:-1].rpartition(b"-")[0],
                         b"destination:/queue/t%2Fmain.retry")
        self.assertIn(b"x-dead-letter-exchange:", head)
        self.assertIn(b"x-dead-letter-routing-key:t/main", head)
        ttl = int(head[1].rpartition(b"-")[2][:-2])
        self.assertIn(b"x-message-ttl:%d" % ttl, head)
        self.assertLessEqual(ttl, 30_000)

    def test_quorumQueues(self):
        """
        With [stomp] queue_type = "quorum" each SEND declares its queue, or
        its delay queue, as the daemon does.
        """
        self.config = snqconfig.parse({
            "queue": {"backend": "stomp", "basename": "/queue/t/"},
            "stomp": {"servers": ["tcp://127.0.0.1:1"], "queue_type": "quorum"}})
        self.producer = Producer(config=self.config)
        self.patch(self.producer._backend, "_wire", self.newWire)
        self.answers = [receipt(0) + receipt(1)]
        self.producer.enqueue_many("log", [1])
        self.producer.enqueue("log", 2, delay=30)
        sends = [w for w in self.wires[0].written if w.startswith(b"SEND")]
        self.assertEqual(len(sends), 2)
        for write in sends:
            head = write.partition(b"\n\n")[0].split(b"\n")
            self.assertIn(b"x-queue-type:quorum", head)
            self.assertNotIn(b"x-max-priority", write)

    def test_refused(self):
        """An ERROR frame is the cause: its message and body."""
        self.answers = [b"ERROR\nmessage:access_refused\ncontent-length:3\n\nno!\0"]
        e = self.assertRaises(EnqueueError, self.producer.enqueue, "log", 1)
        self.assertIsInstance(e.__cause__, BrokerError)
        self.assertIn("the broker refused: access_refused: no!", str(e))
        self.assertTrue(self.wires[0].closed)

    def test_closingWhileIdle(self):
        """Something came while idle (the broker closing it): on a new one."""
        self.answers = [receipt(0)]
        self.producer.enqueue("log", 1)
        self.wires[0].chunks.append(b"ERROR\nmessage:bye\n\n\0")
        self.producer.enqueue("log", 2)
        first, second = self.wires
        self.assertEqual(first.written[2:], [b"DISCONNECT\n\n\0"],
                         "no SEND there")
        self.assertTrue(first.closed)
        self.assertEqual(len(second.written), 2)
