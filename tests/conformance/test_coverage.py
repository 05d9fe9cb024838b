"""Every method of every store protocol is exercised by the conformance suites, on both stores.

The fixtures of ``conftest.py`` wrap each store in a ``Recorder`` that notes the methods the
tests call; this test runs after the suites (``pytest_collection_modifyitems``) and fails when
a protocol method was never called on one of the implementations. Run alone, or with a subset
of the suites, it is skipped: what was not run cannot be judged.
"""

from __future__ import annotations

import inspect

import pytest
from conftest import CALLED, COMPLETE

from listener.analysis.batch_store import BatchStore
from listener.analysis.dedup_store import DedupStore
from listener.analysis.face_store import FaceStore
from listener.queue.store import JobStore

PROTOCOLS = (JobStore, BatchStore, DedupStore, FaceStore)


def methods(protocol: type) -> set[str]:
    """The public methods a protocol declares."""
    return {
        name
        for name, value in vars(protocol).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }


def test_the_protocols_declare_methods() -> None:
    assert "claim" in methods(JobStore) and "take_for_batch" in methods(BatchStore)
    assert methods(DedupStore) == {"find_reusable"}
    assert methods(FaceStore) == {"forget_faces"}


def test_every_store_method_is_exercised_on_both_stores() -> None:
    if not COMPLETE[0]:
        pytest.skip("the conformance suites did not all run in this session")
    kinds = {kind for _, kind in CALLED}
    assert kinds, "no store was recorded"
    missing = {
        f"{protocol.__name__}.{name} ({kind})"
        for protocol in PROTOCOLS
        for kind in kinds
        for name in methods(protocol) - CALLED.get((protocol.__name__, kind), set())
    }
    assert not missing, f"not exercised by the conformance suites: {sorted(missing)}"
