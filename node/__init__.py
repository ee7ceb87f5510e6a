"""Infernode: a self-hosted inference node appliance."""

__version__ = "0.1.0"
