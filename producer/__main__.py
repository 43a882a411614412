"""`python -m producer ...`: the `producer` command where its console script is not installed."""

from producer.cli import app

if __name__ == "__main__":
    app(prog_name="producer")
