"""``python -m polyak``: the same as the ``polyak`` command."""

from polyak.cli.main import main

if __name__ == "__main__":
    main()
