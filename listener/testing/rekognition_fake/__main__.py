"""``python -m listener.testing.rekognition_fake``: serve the fake until SIGTERM or SIGINT."""

from __future__ import annotations

from listener.testing.rekognition_fake.process import main

main()
