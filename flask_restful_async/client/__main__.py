"""``python -m flask_restful_async.client``: see :mod:`flask_restful_async.client.cli`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
