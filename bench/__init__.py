"""Owns `make bench`: poolkeeper against a no-op floor and OPA, in-process, through an API server.

See bench/README.md for what is measured, how, and the last results.
"""
