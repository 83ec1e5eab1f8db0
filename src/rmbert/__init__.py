"""rmbert: RMBERT news recommendation (SIGIR 2021) with the MIND workflow end to end."""

__version__ = "0.1.0"
