"""pykata: the Kata Containers guest-side stack in Python."""

__version__ = "0.1.0"
