"""The app: the retrieval service over a case source, clinicians' feedback, the HTTP API and the
web UI."""
