"""The tooling suite's fixtures: the product suite's own (the bundled dataset)."""

from tests.conftest import data_dir  # noqa: F401  (a fixture, registered by being imported here)
