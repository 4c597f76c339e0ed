"""``python -m momlp_lite.distributed CONFIG``: the same command alone or under torchrun."""

from .train import main

raise SystemExit(main())
