"""snq: a queue daemon for web applications, built on Twisted."""

__version__ = "0.1.0"
