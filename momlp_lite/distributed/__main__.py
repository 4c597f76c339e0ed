"""``python -m momlp_lite.distributed CONFIG``: the same command alone or under torchrun."""

from .cli import main

raise SystemExit(main())
