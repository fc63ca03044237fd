# -*- test-case-name: tests.test_testing -*-
"""
L{snq.testing} as pytest fixtures.  In a C{conftest.py}:

    pytest_plugins = ["snq.testing.fixtures"]
"""

import pytest

from snq.testing import FakeClock, RecordingQueue


@pytest.fixture
def snq_clock():
    """A L{FakeClock}: time moves when the test says."""
    return FakeClock()


@pytest.fixture
def snq_queue(snq_clock):
    """A L{RecordingQueue} on C{snq_clock}: what handlers enqueue."""
    return RecordingQueue(snq_clock)
