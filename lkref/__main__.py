"""python -m lkref: see lkref.cli."""

from .cli import main

raise SystemExit(main())
