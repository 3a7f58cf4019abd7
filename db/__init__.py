"""The database layer shared by ``api`` and ``worker``: models, session factory, job transitions.

Imports neither ``api`` nor ``worker`` and never reads the environment: URLs are passed in.
"""
