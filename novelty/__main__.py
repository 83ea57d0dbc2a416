"""`python -m novelty ...`: the same CLI as the `novelty` script."""
from .cli import app

if __name__ == "__main__":
    app(prog_name="novelty")
