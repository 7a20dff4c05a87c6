"""`python -m proxy` works like the `pgwarden` command."""

from proxy.cli import main

raise SystemExit(main())
