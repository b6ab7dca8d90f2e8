"""`python -m fp8linear ...`: the same command as the `fp8linear` console script (fp8linear.cli)."""

from .cli import main

raise SystemExit(main())
