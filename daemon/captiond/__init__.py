"""captiond: a local, always-on speech-to-text daemon."""

__version__ = "0.1.0"
