# -*- test-case-name: tests.test_monitor -*-
"""
Logs as JSON lines, for log shippers (Vector, Fluent Bit, Filebeat, …)::

    twistd --nodaemon --logger=snq.logs.jsonLines snq

writes every event, the workers' lines included, as one line of
twisted.logger's JSON (what C{twisted.logger.eventsFromJSONLogFile} reads
back) to standard output.

A twistd C{--logger} and not a config key: twistd sets up logging itself,
before the config is read, and C{--logger} is its way to choose how.
"""

import sys

from twisted.logger import jsonFileLogObserver


def jsonLines():
    """twistd's C{--logger} factory: one JSON object a line on stdout."""
    # Taken now: once logging starts, twistd replaces sys.stdout with a
    # file that logs what is written to it.
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
