"""`python -m novelty ...`: the same CLI as the `novelty` script."""
from .cli import app

app(prog_name="novelty")
