"""`python -m tarfuse`: the same as the `tarfuse` command."""

from tarfuse.cli import main

raise SystemExit(main())
