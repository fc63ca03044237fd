# -*- test-case-name: tests.test_client,tests.test_client_servers -*-
"""
A producer's socket to Redis or a STOMP broker: one request written in one
call, what comes back read as it comes.  A plain TCP socket stays in
blocking mode with its timeout in the kernel (C{SO_RCVTIMEO},
C{SO_SNDTIMEO}), so each read or write is one system call, without the
C{poll} Python adds before each one on a socket with a timeout.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct


def tlsContext(caFile: str = "", certFile: str = "",
               keyFile: str = "") -> ssl.SSLContext:
    """The system's CAs unless C{caFile}; the server must be the host named."""
    context = ssl.create_default_context(cafile=caFile or None)
    if certFile:
        context.load_cert_chain(certFile, keyFile or None)
    return context


class Wire:
    """
    One connection, used by one thread at a time.  Reads and writes raise
    C{OSError}: C{TimeoutError} after C{timeout} seconds without progress,
    C{ConnectionError} when the server closed it.
    """

    def __init__(self, host: str, port: int, timeout: float,
                 tls: ssl.SSLContext | None = None):
        self.timeout = timeout
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                # Python's own timeout: a TLS read may need several reads of
                # the socket.
                sock = tls.wrap_socket(sock, server_hostname=host)
            else:
                sock.settimeout(None)
                seconds = int(timeout)
                # 0 s 0 µs would mean "no limit".
                micro = int((timeout - seconds) * 1e6) or int(not seconds)
                limit = struct.pack("ll", seconds, micro)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def write(self, data: bytes):
        try:
            self.sock.sendall(data)
        except (TimeoutError, BlockingIOError, ssl.SSLWantWriteError):
            raise TimeoutError(f"could not write within {self.timeout:g} s")

    def read(self) -> bytes:
        """What has come, at least a byte."""
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            raise TimeoutError(f"no answer within {self.timeout:g} s")
        if not data:
            raise ConnectionError("closed by the server")
        return data

    def readable(self) -> bool:
        """Whether something (or the end) has come and waits to be read."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self):
        self.sock.close()
