"""``python -m loramux.client``: the command line (the ``loramux`` command); see cli.py."""

import sys

from loramux.client.cli import main

sys.exit(main())
