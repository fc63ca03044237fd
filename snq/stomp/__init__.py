# -*- test-case-name: tests.test_stomp_protocol -*-
"""STOMP support: a Twisted client protocol on stompest's sans-IO layer."""
