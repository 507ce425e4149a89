"""Errors a user can act on, apart from bugs.

Every exception the product raises for bad input, a missing resource or an unavailable service is
a :class:`NeurocbirError`, raised where the input is checked, with a message written for the user
and the HTTP status it maps to. The web layer answers these with their status and message; any
other exception is a bug: a 500 carrying a request id (the traceback goes to the server log). The
CLI prints a ``NeurocbirError`` as one line (exit code 2) and lets a bug show its traceback.
"""

from __future__ import annotations


class NeurocbirError(Exception):
    """Something the user (or the operator) can fix; ``status``: the HTTP status it is answered with."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidInput(NeurocbirError, ValueError):
    """A value, file or option that is not acceptable (400; a ValueError too)."""


class TooLarge(InvalidInput):
    """An upload over a size limit (413)."""

    status = 413


class NotFound(NeurocbirError, LookupError):
    """No such case, run, file or resource (404)."""

    status = 404


class Conflict(NeurocbirError):
    """The resource is busy or in a state that forbids the request (409)."""

    status = 409


class Unavailable(NeurocbirError):
    """A service the answer needs cannot be used right now (503)."""

    status = 503


class UpstreamError(NeurocbirError):
    """Another server (the PACS, the identity provider, an LLM) failed us (502)."""

    status = 502


class ConfigurationError(NeurocbirError, ValueError):
    """The server or a command is set up in a way that cannot work (refused at start)."""

    status = 500
