# -*- test-case-name: tests.test_client -*-
"""What a producer raises when its backend does not take the items."""


class EnqueueError(Exception):
    """
    The items were not stored, or it cannot be known whether they were (a
    connection lost before the answer); C{__cause__} is the driver's own
    exception.  The message names the backend, never its password.
    """
