"""The tooling suite's fixtures: the product suite's own (the bundled dataset)."""

from tests.conftest import data_dir, external  # noqa: F401  (fixtures, registered by being imported here)
