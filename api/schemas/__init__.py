"""Pydantic request/response models of the API (never ORM subclasses; built from rows explicitly)."""
