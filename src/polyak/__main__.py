"""``python -m polyak``: the same as the ``polyak`` command."""

from polyak.cli.main import run

if __name__ == "__main__":
    run()
