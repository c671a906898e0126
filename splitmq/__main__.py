"""``python -m splitmq``: the same as the ``splitmq`` command."""
import sys

from splitmq.workers.cli import main

sys.exit(main())
