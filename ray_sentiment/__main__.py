"""``python -m ray_sentiment``: the ``sentiment`` command."""

from __future__ import annotations

import sys

from ray_sentiment.cli import main

sys.exit(main())
