# -*- test-case-name: tests.test_stomp_protocol -*-
"""
A Twisted STOMP client protocol on stompest's sans-IO layer.

stompest's own Twisted client (C{stompest.async}) does not import on Python
3.7+, so this module drives C{stompest.protocol} (parser, session, frame
commands) from a plain Twisted L{Protocol}.  It covers one connection:
handshake, heart-beats, receipts, subscriptions.  Reconnecting is left to
L{twisted.application.internet.ClientService}.
"""

import itertools
import re

from stompest.error import StompFrameError, StompProtocolError
from stompest.protocol import StompParser, StompSession, StompSpec
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from snq.service import defaultReactor

ALL_VERSIONS = (StompSpec.VERSION_1_0, StompSpec.VERSION_1_1, StompSpec.VERSION_1_2)

# What STOMP 1.1+ escapes in a header value.
_NEEDS_ESCAPE = re.compile(r"[\\\r\n:]")

# How many negotiated server heart-beat intervals of silence we put up with
# before calling the connection dead: the spec leaves room for network delay.
HEART_BEAT_TOLERANCE = 2.0


class StompServerError(Exception):
    """The broker sent an ERROR frame; C{frame} keeps all of it."""

    def __init__(self, frame):
        self.frame = frame
        self.message = frame.headers.get("message", "")
        self.details = frame.body.decode("utf-8", "replace")
        super().__init__(self.message, self.details)

    def __str__(self):
        return f"{self.message}: {self.details}" if self.details else self.message


class StompTimeoutError(DeferredTimeoutError):
    """The broker did not answer CONNECT in time."""


class _Parser(StompParser):
    """
    stompest's parser, also taking STOMP 1.2's CRLF heart-beats.

    stompest 2.3.0 only knows LF heart-beats and fails on a CR between
    frames; skipping the CR lets its own code take the LF that follows.
    """

    def _parseHeartBeat(self):
        if (
            self.version == StompSpec.VERSION_1_2
            and self._data[self._start : self._start + 2] == b"\r\n"
        ):
            self._start += 1
        return super()._parseHeartBeat()


def _noConnected(result, timeout):
    """Turn the cancellation done by L{Deferred.addTimeout} into a clear error."""
    return Failure(
        StompTimeoutError(f"no CONNECTED from the STOMP broker within {timeout} s")
    )


class StompClientProtocol(Protocol):
    """
    The client side of one STOMP connection.

    Call L{connect} once the transport is up (in ClientService's
    C{prepareConnection}).  The other commands need a connected session and
    raise L{StompProtocolError} otherwise, as stompest's session does.
    """

    log = Logger()
    #: Whether the session's start and end are logged at info level (else
    #: debug): not for the many short sessions of a cluster registry.
    noisy = True

    def __init__(self, clock=None, heartBeatTolerance=HEART_BEAT_TOLERANCE):
        clock = defaultReactor(clock)
        self.clock = clock
        self.heartBeatTolerance = heartBeatTolerance
        self._session = StompSession(StompSpec.VERSION_1_2)
        self._parser = _Parser(StompSpec.VERSION_1_2)
        self._ids = itertools.count(1)
        self._connecting = None
        self._receipts = {}
        self._disconnectedWaiters = []
        self._lost = None
        self._lastSent = self._lastReceived = 0.0
        self._beatCall = self._watchCall = self._closeCall = None

    # Commands

    def connect(
        self,
        login=None,
        passcode=None,
        vhost=None,
        versions=ALL_VERSIONS,
        heartBeats=(0, 0),
        timeout=None,
        headers=None,
    ):
        """
        Send CONNECT; the Deferred fires with the negotiated version string.

        It fails with L{StompServerError} on an ERROR reply, with
        L{ConnectionLost} if the connection ends first, with
        L{StompTimeoutError} after C{timeout} seconds.  On a timeout or an
        ERROR the connection is closed here: ClientService does not close it
        when C{prepareConnection} fails.

        @param heartBeats: (cx, cy) in ms: how often we can send heart-beats
            and how often we want them.  Not sent when only STOMP 1.0 is
            offered, as 1.0 brokers refuse the header.
        """
        versions = sorted(versions)
        headers = dict(headers or {})
        if vhost is not None:
            # stompest adds host only for 1.1+; 1.0 brokers (RabbitMQ) read it too.
            headers[StompSpec.HOST_HEADER] = vhost
        if versions == [StompSpec.VERSION_1_0] or not any(heartBeats):
            heartBeats = None
        frame = self._session.connect(
            login, passcode, headers, versions, vhost, heartBeats
        )
        # The reply comes in the highest version the broker shares with us.
        self._parser.version = versions[-1]
        self._connecting = Deferred(self._cancelConnect)
        self._write(frame)
        if timeout is not None:
            self._connecting.addTimeout(timeout, self.clock, _noConnected)
        return self._connecting

    def subscribe(self, destination, onMessage, headers=None, receipt=True):
        """
        Have C{onMessage(frame)} called with each MESSAGE for C{destination}.

        The Deferred fires with the subscription token (for L{unsubscribe})
        on the broker's RECEIPT, or at once if C{receipt} is false.  An C{id}
        header, which STOMP 1.1+ requires, is made up unless given.
        """
        headers = dict(headers or {})
        if self._session.version != StompSpec.VERSION_1_0:
            headers.setdefault(StompSpec.ID_HEADER, f"sub-{next(self._ids)}")
        receiptId = self._receiptId(receipt)
        frame, token = self._session.subscribe(
            destination, headers, receiptId, context=onMessage
        )
        return self._send(frame, receiptId).addCallback(lambda _: token)

    def unsubscribe(self, token, receipt=False):
        """End a subscription; MESSAGEs still in flight for it are dropped."""
        receiptId = self._receiptId(receipt)
        return self._send(self._session.unsubscribe(token, receiptId), receiptId)

    def send(self, destination, body=b"", headers=None, receipt=False):
        """
        Send C{body} (bytes); fires on RECEIPT if asked for, else at once.

        A content-length header is added so that the body may hold NULs.
        """
        receiptId = self._receiptId(receipt)
        frame = self._session.send(destination, body, headers, receiptId)
        if body and StompSpec.CONTENT_LENGTH_HEADER not in frame.headers:
            frame.setContentLength()
        return self._send(frame, receiptId)

    def ack(self, frame, receipt=False):
        """
        Acknowledge a MESSAGE frame with the headers its version asks for.

        stompest does this: 1.2 sends the MESSAGE's C{ack} header as C{id},
        1.1 C{message-id} and C{subscription}, 1.0 C{message-id}.  Except
        in the common case, one per item a worker handles: a STOMP 1.2 ACK
        without receipt or transaction, whose id needs no escaping, is
        written here, at a fifth of the cost of building the frame.
        """
        if not receipt and self._session.state == StompSession.CONNECTED:
            ackId = frame.headers.get(StompSpec.ACK_HEADER)
            if (
                self._session.version == StompSpec.VERSION_1_2
                and ackId is not None
                and StompSpec.TRANSACTION_HEADER not in frame.headers
                and not _NEEDS_ESCAPE.search(ackId)
            ):
                self._writeData(b"ACK\nid:%s\n\n\0" % ackId.encode("utf-8"))
                return succeed(None)
        receiptId = self._receiptId(receipt)
        return self._send(self._session.ack(frame, receiptId), receiptId)

    def nack(self, frame, receipt=False):
        """Reject a MESSAGE frame like L{ack}; STOMP 1.0 has no NACK (raises)."""
        receiptId = self._receiptId(receipt)
        return self._send(self._session.nack(frame, receiptId), receiptId)

    def disconnect(self, receipt=True, timeout=None):
        """
        Send DISCONNECT and close; fires with None once the connection is gone.

        With C{receipt} the transport is closed only after the broker's
        RECEIPT, which tells us it processed everything we sent.  After
        C{timeout} seconds the connection is aborted instead.
        """
        receiptId = self._receiptId(receipt)
        frame = self._session.disconnect(receiptId)
        done = self.whenDisconnected().addCallback(lambda _: None)
        self._send(frame, receiptId).addCallbacks(
            lambda _: self.transport.loseConnection(),
            # Lost, or refused with ERROR: the connection is closing anyway.
            lambda _: None,
        )
        if timeout is not None:
            self._closeCall = self.clock.callLater(
                timeout, self._closeTimedOut, timeout
            )
        return done

    @property
    def lost(self):
        """Whether the connection has ended: no command can be sent any more."""
        return self._lost is not None

    @property
    def server(self):
        """
        The broker's C{server} header (C{"RabbitMQ/3.10.8"}), or None: what
        a backend goes by where brokers read destinations differently.
        """
        return self._session.server

    def whenDisconnected(self):
        """
        Fire with the exception that ended the connection (never fail).

        This is how a backend learns the connection is over; ClientService
        reconnects on its own.
        """
        if self._lost is not None:
            return succeed(self._lost)
        waiter = Deferred()
        self._disconnectedWaiters.append(waiter)
        return waiter

    # Protocol

    def connectionMade(self):
        self._lastSent = self._lastReceived = self.clock.seconds()

    def dataReceived(self, data):
        self._lastReceived = self.clock.seconds()
        while data:
            end = len(data)
            if self._session.state == StompSession.CONNECTING:
                # Stop after each NUL so that what follows CONNECTED is parsed
                # in the negotiated version (escapes and heart-beats differ).
                end = data.find(b"\0") + 1 or end
            chunk, data = data[:end], data[end:]
            try:
                self._parser.add(chunk)
            except StompFrameError:
                self.log.failure("Unparseable data from the STOMP broker")
                self.transport.abortConnection()
                return
            while self._parser.canRead():
                self._frameReceived(self._parser.get())

    def connectionLost(self, reason=connectionDone):
        for call in (self._beatCall, self._watchCall, self._closeCall):
            if call is not None and call.active():
                call.cancel()
        self._session.close()
        self._lost = reason.value
        self._note(
            "STOMP connection closed: {reason}", reason=reason.getErrorMessage()
        )
        # Those watching the connection learn first, so that whoever reacts to
        # a failed command below already finds it gone.
        waiters, self._disconnectedWaiters = self._disconnectedWaiters, []
        for waiter in waiters:
            waiter.callback(self._lost)
        self._failPending(
            ConnectionLost(f"STOMP connection closed: {reason.getErrorMessage()}")
        )

    # Incoming frames

    def _frameReceived(self, frame):
        if not frame:
            # A heart-beat: dataReceived has already noted that data came in.
            return
        # Build the headers dict once: on a parsed frame each .headers access
        # rebuilds it, and session, commands and handlers read it often.
        frame.unraw()
        handler = getattr(self, f"_frame_{frame.command}", None)
        if handler is None:
            self.log.warn(
                "Ignoring unexpected {command} frame from the STOMP broker",
                command=frame.command,
            )
            return
        handler(frame)

    def _frame_CONNECTED(self, frame):
        connecting, self._connecting = self._connecting, None
        if connecting is None:
            self.log.warn("Ignoring CONNECTED frame: no CONNECT is pending")
            return
        try:
            self._session.connected(frame)
        except StompProtocolError:
            self.transport.abortConnection()
            connecting.errback()
            return
        version = self._session.version
        self._parser.version = version
        self._startHeartBeats()
        self._note(
            "STOMP {version} session {session} with {server}",
            version=version,
            session=self._session.id,
            server=self._session.server,
        )
        connecting.callback(version)

    def _frame_MESSAGE(self, frame):
        try:
            token = self._session.message(frame)
        except StompProtocolError:
            self.log.warn(
                "Dropping MESSAGE for no active subscription: {headers}",
                headers=frame.headers,
            )
            return
        try:
            self._session.subscription(token)(frame)
        except Exception:
            self.log.failure(
                "Message handler for {destination} failed",
                destination=frame.headers.get(StompSpec.DESTINATION_HEADER),
            )

    def _frame_RECEIPT(self, frame):
        try:
            waiter = self._receipts.pop(self._session.receipt(frame))
        except (StompProtocolError, KeyError):
            self.log.warn(
                "Ignoring RECEIPT nobody waits for: {headers}", headers=frame.headers
            )
            return
        waiter.callback(None)

    def _frame_ERROR(self, frame):
        """
        Log the error, fail whatever waits for an answer, and close.

        STOMP 1.1+ says the broker closes the connection after ERROR, but
        RabbitMQ does not always (rabbitmq-stomp#16); closing here keeps our
        state simple and lets ClientService reconnect.
        """
        error = StompServerError(frame)
        self.log.error(
            # Not "message": the legacy log bridge owns that event key.
            "STOMP broker sent ERROR: {errorMessage}\n{details}",
            errorMessage=error.message,
            details=error.details,
        )
        self._failPending(error)
        self.transport.loseConnection()

    # Helpers

    def _note(self, format, **fields):
        (self.log.info if self.noisy else self.log.debug)(format, **fields)

    def _receiptId(self, receipt):
        return f"receipt-{next(self._ids)}" if receipt else None

    def _send(self, frame, receiptId):
        """Write C{frame}; the Deferred fires on the RECEIPT for C{receiptId}."""
        self._write(frame)
        if receiptId is None:
            return succeed(None)
        self._receipts[receiptId] = waiter = Deferred()
        return waiter

    def _write(self, frame):
        self._writeData(bytes(frame))

    def _writeData(self, data):
        self.transport.write(data)
        self._lastSent = self.clock.seconds()

    def _failPending(self, error):
        pending = list(self._receipts.values())
        self._receipts.clear()
        if self._connecting is not None:
            pending.append(self._connecting)
            self._connecting = None
        for waiter in pending:
            waiter.errback(error)

    def _cancelConnect(self, connecting):
        """Giving up on the handshake (timeout, ClientService stop) closes."""
        self._connecting = None
        self.transport.abortConnection()

    def _closeTimedOut(self, timeout):
        self.log.warn(
            "STOMP connection still open {timeout} s after DISCONNECT; aborting it",
            timeout=timeout,
        )
        self.transport.abortConnection()

    def _startHeartBeats(self):
        """Beat and watch at the negotiated intervals (ms; 0 means never)."""
        sendEvery = self._session.clientHeartBeat / 1000
        if sendEvery:
            self._beatCall = self.clock.callLater(sendEvery, self._beat, sendEvery)
        silenceLimit = self._session.serverHeartBeat / 1000 * self.heartBeatTolerance
        if silenceLimit:
            self._watchCall = self.clock.callLater(
                silenceLimit, self._watch, silenceLimit
            )

    def _beat(self, sendEvery):
        """Send an EOL if we have been quiet for C{sendEvery} seconds."""
        idle = self.clock.seconds() - self._lastSent
        if idle >= sendEvery:
            self._write(self._session.beat())
            idle = 0
        self._beatCall = self.clock.callLater(sendEvery - idle, self._beat, sendEvery)

    def _watch(self, silenceLimit):
        """Drop the connection once the broker is silent for C{silenceLimit} s."""
        silence = self.clock.seconds() - self._lastReceived
        if silence >= silenceLimit:
            self.log.warn(
                "Nothing from the STOMP broker for {silence:.1f} s "
                "(limit {limit:.1f} s); dropping the connection",
                silence=silence,
                limit=silenceLimit,
            )
            self.transport.abortConnection()
            return
        self._watchCall = self.clock.callLater(
            silenceLimit - silence, self._watch, silenceLimit
        )


class StompFactory(Factory):
    """
    Build L{StompClientProtocol}s that share one clock.

    Give it the clock given to ClientService (a Clock in tests) so that
    reconnection and heart-beats run on the same time.
    """

    protocol = StompClientProtocol

    def __init__(self, clock=None, heartBeatTolerance=HEART_BEAT_TOLERANCE):
        self.clock = clock
        self.heartBeatTolerance = heartBeatTolerance

    def buildProtocol(self, addr):
        stomp = self.protocol(self.clock, self.heartBeatTolerance)
        stomp.factory = self
        stomp.noisy = self.noisy
        return stomp
