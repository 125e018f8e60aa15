"""``python -m batchnorm`` runs the command-line tool."""

from batchnorm.cli import main

raise SystemExit(main())
