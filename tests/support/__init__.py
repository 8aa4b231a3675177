"""Helpers shared by the end-to-end tests (regtest node, daemons)."""
