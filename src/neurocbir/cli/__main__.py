"""``python -m neurocbir.cli``: the same as the ``neurocbir`` command."""

from neurocbir.cli import app

app()
