# -*- test-case-name: tests.test_journal -*-
"""
A worker's journal: which items its handlers are running at this moment,
kept where the master can read it after the worker has gone, however it
went (C{kill -9}, C{os._exit} in a handler, the OOM killer).

The master makes one per worker process, an unlinked temporary file, and
hands it over as an inherited file descriptor (L{snq.pool}).  The worker
maps it into memory and, for each item, writes the item's key into a free
slot just before calling the handler and clears the slot when the handler
returns.  That is two stores into shared memory per item: no system call,
no message to the master, no disk write in the ordinary run (the pages live
in the page cache, which a killed process does not take with it).  After a
death the master reads the slots still marked: the items that were running,
and only those, are charged an attempt (L{snq.reaper}); the others the dead
worker held go back unchanged.

A slot is L{SLOT} bytes: a state byte (1 = running), the key's length in
two bytes, the key.  The key is written before the state byte, so a slot
caught half written reads as free: its handler had not been called yet.
"""

import hashlib
import mmap
import os
import tempfile

from twisted.logger import Logger

SLOT = 256
MAX_KEY = SLOT - 3
RUNNING = 1


def fit(key: bytes) -> bytes:
    """A key as a slot holds it: itself, or a digest of a long one."""
    if len(key) <= MAX_KEY:
        return key
    return b"#" + hashlib.sha256(key).hexdigest().encode()


class Journal:
    """
    Both ends of one worker's journal: the master L{create}s it and reads
    it (L{running}); the worker L{attach}es to the descriptor it inherited
    and marks slots (L{start}, L{finish}).
    """

    log = Logger()

    def __init__(self, fd: int, owned=None):
        self.fd = fd
        #: The master's file object, which keeps the descriptor open.
        self._owned = owned
        self._map = None
        self._free: list[int] = []

    @classmethod
    def create(cls, slots: int) -> "Journal":
        """A new journal of C{slots} slots (it grows if more are needed)."""
        f = tempfile.TemporaryFile(prefix="snq-journal-")  # noqa: SIM115 (kept)
        os.ftruncate(f.fileno(), max(slots, 1) * SLOT)
        return cls(f.fileno(), f)

    @classmethod
    def attach(cls, fd: int) -> "Journal":
        journal = cls(fd)
        size = os.fstat(fd).st_size
        journal._map = mmap.mmap(fd, size)
        journal._free = list(range(size // SLOT - 1, -1, -1))
        return journal

    def start(self, key: bytes) -> int | None:
        """Mark C{key} as running → its slot (None if none could be had)."""
        if not self._free and not self._grow():
            return None
        slot = self._free.pop()
        key = fit(key)
        offset = slot * SLOT
        self._map[offset + 1:offset + 3 + len(key)] = (
            len(key).to_bytes(2, "big") + key)
        self._map[offset] = RUNNING
        return slot

    def finish(self, slot: int | None):
        if slot is not None:
            self._map[slot * SLOT] = 0
            self._free.append(slot)

    def _grow(self) -> bool:
        """Twice the slots: more items run than the master expected."""
        old = len(self._map) // SLOT
        try:
            os.ftruncate(self.fd, 2 * old * SLOT)
            grown = mmap.mmap(self.fd, 2 * old * SLOT)
        except OSError:
            self.log.failure("the journal cannot grow; items beyond its {n} "
                             "slots run unrecorded", n=old)
            return False
        self._map.close()
        self._map = grown
        self._free.extend(range(2 * old - 1, old - 1, -1))
        return True

    def running(self) -> set[bytes]:
        """The keys marked as running, read from the file (the master's side)."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0)
        keys = set()
        for offset in range(0, len(data) - SLOT + 1, SLOT):
            if data[offset] == RUNNING:
                length = int.from_bytes(data[offset + 1:offset + 3], "big")
                keys.add(data[offset + 3:offset + 3 + min(length, MAX_KEY)])
        return keys

    def close(self):
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._owned is not None:
            self._owned.close()
            self._owned = None
