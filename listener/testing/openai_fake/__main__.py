"""``python -m listener.testing.openai_fake``: serve the fake until SIGTERM or SIGINT."""

from __future__ import annotations

import sys

from listener.testing.openai_fake.process import main

main(sys.argv[1:])
