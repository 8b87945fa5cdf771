"""``python -m cli``: the ``refit`` command where it is not installed as a script (the trainer's
image: ``docker compose exec trainer python -m cli gc``)."""

from cli import main

raise SystemExit(main())
