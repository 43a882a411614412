"""`python -m worker ...`: the `worker` command where its console script is not installed."""

from worker.cli import app

if __name__ == "__main__":
    app(prog_name="worker")
