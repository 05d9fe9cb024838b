"""Faces that users manage: accept, reject, merge, rename, from the app's role and the CLI.

Real Postgres; the faces, people and suggestions are made by the faces step itself, stored by
``PgJobStore.save_step`` (``listener.apply_face_effects``). Every test runs twice, once per
back end of the faces step (the ``backend`` fixture's parameter), on the same ``SEED``:

- ``rekognition``: the real ``RekognitionProvider`` (``aioboto3``) against the Rekognition
  fake. The fake's test photos give the similarities the thresholds sort on: two photos of
  face "a" about 99 (assigned), the half-veiled "a_borderline" about 89 against "a" (a
  suggestion), the mirrored "b" about 59 (new).
- ``local``: the offline ``LocalProvider`` (dlib embeddings in a worker process, searched in
  Postgres by the ``nearest_faces`` query) on real photographs (``tests/people.py``): a1 and
  a2 are two photographs of Barack Obama (96 %, assigned), "border" a blurred third one (87 %
  against a1, a suggestion), b a photograph of Joe Biden (under 40 %, new).

The review itself (``listener.*`` SQL functions, ``FaceReview``, the CLI) does not know which
back end made the faces; only the collection's name differs (``listener-<owner>`` or
``listener-local-<owner>``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from people import local_faces_provider, obama_borderline, photo
from support import cli

from listener.analysis.face_store import pg_effect_writers
from listener.analysis.faces import PgKnownFaces
from listener.analysis.providers.base import ImageInput, Provider, StepContext
from listener.analysis.providers.rekognition import RekognitionProvider
from listener.app_side.face_review import FaceReview
from listener.db.queries import Queries
from listener.ops.status import queue_status
from listener.ops.status_page import render
from listener.queue.pg_store import PgJobStore
from listener.settings import RekognitionSettings
from listener.testing import FakeRekognition, face_photo

pytestmark = pytest.mark.usefixtures("aws_env")

TABLE = "public.images"
BACKENDS = ("rekognition", "local")
PHOTOS = {
    "rekognition": {
        "a1": face_photo("a", seed=1, scale=1.0),
        "a2": face_photo("a", seed=2, scale=1.25, position=(40, 60), brightness=1.05),
        "border": face_photo("a_borderline", seed=3, scale=0.9),
        "b": face_photo("b", seed=4),
    },
    "local": {
        "a1": photo("obama_1.jpg"),
        "a2": photo("obama_2.jpg"),
        "border": obama_borderline(),
        "b": photo("biden_1.jpg"),
    },
}
# The faces step's collections: "<prefix>-<owner>".
PREFIX = {"rekognition": "listener", "local": "listener-local"}
# Per owner, in order: alice's suggestion has a candidate in no person yet, bob's a candidate
# in a person (a1 and a2, assigned at 95% or more).
SEED = [
    ("alice", "a1", "new"),
    ("alice", "border", "suggested"),
    ("alice", "b", "new"),
    ("bob", "a1", "new"),
    ("bob", "a2", "assigned"),
    ("bob", "border", "suggested"),
]


@dataclass(frozen=True)
class Seeded:
    """Face ids by (owner, photo), each owner's one suggestion (face, candidate), and the back
    end that made them."""

    faces: dict[tuple[str, str], str]
    suggestion: dict[str, tuple[str, str]]
    backend: str

    def collection(self, owner: str) -> str:
        """The owner's collection, as the faces step of this back end names it."""
        return f"{PREFIX[self.backend]}-{owner}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which faces step made the faces: ``rekognition`` (the fake) or ``local`` (offline)."""
    name: str = request.param
    return name


@asynccontextmanager
async def faces_step(backend: str, pool: asyncpg.Pool) -> AsyncIterator[tuple[Provider, str]]:
    """The started provider of ``backend``'s faces step and the step's name."""
    if backend == "local":
        async with local_faces_provider(pool) as local:
            yield local, "local.faces"
        return
    async with FakeRekognition() as fake:
        provider = RekognitionProvider(
            RekognitionSettings(endpoint_url=fake.endpoint_url, region="us-east-1"),
            PgKnownFaces(Queries(pool)),
        )
        await provider.start()
        try:
            yield provider, "rekognition.faces"
        finally:
            await provider.close()


@pytest.fixture
async def seeded(pool: asyncpg.Pool, backend: str) -> Seeded:
    """Runs the faces step on each photo of ``SEED`` and stores it, as the daemon does."""
    store = PgJobStore(pool, effects=pg_effect_writers())
    faces: dict[tuple[str, str], str] = {}
    suggestion: dict[str, tuple[str, str]] = {}
    async with faces_step(backend, pool) as (provider, step):
        for owner, name, decision in SEED:
            source_id = f"{owner}-{name}"
            await store.enqueue(TABLE, source_id, f"http://photos/{source_id}.jpg", owner)
            (job,) = await store.claim(1, "worker-1", 30.0, uuid.uuid4())
            image = ImageInput(
                job.id, TABLE, source_id, owner, "", PHOTOS[backend][name], "JPEG", 640, 480
            )
            result = await provider.run("faces", image, StepContext(step, {}, job.claims))
            assert result is not None and result.step == step
            assert await store.save_step(job, result)
            (face,) = result.effects["faces"]["faces"]
            assert face["decision"] == decision, (owner, name, face["similarity"])
            faces[owner, name] = face["face_id"]
            if decision == "suggested":
                suggestion[owner] = (face["face_id"], face["matched_face_id"])
    return Seeded(faces, suggestion, backend)


async def person_of(conn: asyncpg.Connection, face_id: str) -> int | None:
    person: int | None = await conn.fetchval(
        "SELECT person_id FROM listener.faces WHERE face_id = $1", face_id
    )
    return person


async def status_of(conn: asyncpg.Connection, face_id: str, candidate: str) -> str:
    status: str = await conn.fetchval(
        "SELECT status FROM listener.face_suggestions WHERE face_id = $1 "
        "AND candidate_face_id = $2",
        face_id,
        candidate,
    )
    return status


async def test_accepting_a_suggestion_assigns_the_face_to_the_candidates_person(
    conn: asyncpg.Connection, pool: asyncpg.Pool, seeded: Seeded
) -> None:
    review = FaceReview(pool)
    face, candidate = seeded.suggestion["bob"]
    bobs_person = await person_of(conn, seeded.faces["bob", "a1"])
    assert bobs_person is not None and await person_of(conn, face) is None
    (listed,) = await review.suggestions("bob", 10)
    assert (listed["face_id"], listed["candidate_face_id"]) == (face, candidate)
    assert listed["person_id"] == bobs_person and 80 <= listed["similarity"] < 95
    assert listed["source_id"] == "bob-border"
    assert listed["candidate_source_id"] in ("bob-a1", "bob-a2")
    assert set(listed["bounding_box"]) == {"Width", "Height", "Left", "Top"}

    assert await review.accept("bob", face, candidate) == bobs_person
    assert await person_of(conn, face) == bobs_person
    assert await status_of(conn, face, candidate) == "accepted"
    assert await review.suggestions("bob", 10) == []
    # Accepting again (a retried request) changes nothing.
    assert await review.accept("bob", face, candidate) == bobs_person
    assert await conn.fetchval("SELECT count(*) FROM listener.people") == 1
    (person,) = await review.people("bob", 10)
    assert (person["person_id"], person["faces"]) == (bobs_person, 3)
    assert person["sample_source_id"].startswith("bob-")

    # Alice's candidate is in no person: accepting creates one with both faces.
    face, candidate = seeded.suggestion["alice"]
    assert await person_of(conn, candidate) is None
    created = await review.accept("alice", face, candidate)
    assert created != bobs_person
    assert await person_of(conn, face) == created == await person_of(conn, candidate)
    assert await conn.fetchval("SELECT owner_id FROM listener.people WHERE id = $1", created) == (
        "alice"
    )
    assert await review.counts("alice") == {
        "owner": "alice",
        "people": 1,
        "faces": 3,
        "unassigned": 1,
        "open_suggestions": 0,
    }


async def test_accept_closes_the_faces_other_suggestions(
    conn: asyncpg.Connection, pool: asyncpg.Pool, seeded: Seeded
) -> None:
    face, candidate = seeded.suggestion["alice"]
    other = seeded.faces["alice", "b"]
    # The faces step suggesting a second candidate for the same face.
    effect = {
        "collection_id": seeded.collection("alice"),
        "faces": [
            {
                "face_id": face,
                "bounding_box": {},
                "confidence": 99.0,
                "decision": "suggested",
                "matched_face_id": other,
                "similarity": 81.0,
            }
        ],
    }
    await conn.execute(
        "SELECT listener.apply_face_effects(NULL, $1, 'alice-border', 'alice', $2::jsonb)",
        TABLE,
        json.dumps(effect),
    )
    review = FaceReview(pool)
    listed = await review.suggestions("alice", 10)
    assert [(s["candidate_face_id"], s["similarity"] > 85) for s in listed] == [
        (candidate, True),
        (other, False),
    ]
    person = await review.accept("alice", face, candidate)
    assert await status_of(conn, face, other) == "superseded"
    assert await review.suggestions("alice", 10) == []
    # The user changes their mind: the superseded suggestion can still be accepted.
    moved_to = await review.accept("alice", face, other)
    assert await person_of(conn, face) == moved_to == await person_of(conn, other)
    assert moved_to != person
    assert await person_of(conn, candidate) == person  # the first person keeps its other face

    # Its last face leaving, the first person goes; the suggestions that named it stay.
    effect["faces"][0].update(face_id=candidate, matched_face_id=other)
    await conn.execute(
        "SELECT listener.apply_face_effects(NULL, $1, 'alice-a1', 'alice', $2::jsonb)",
        TABLE,
        json.dumps(effect),
    )
    assert await review.accept("alice", candidate, other) == moved_to
    assert await conn.fetchval("SELECT count(*) FROM listener.people WHERE id = $1", person) == 0
    assert await status_of(conn, face, candidate) == "accepted"
    assert [p["faces"] for p in await review.people("alice", 10)] == [3]


async def test_reject_closes_the_suggestion_and_changes_no_face(
    conn: asyncpg.Connection, pool: asyncpg.Pool, seeded: Seeded
) -> None:
    review = FaceReview(pool)
    face, candidate = seeded.suggestion["bob"]
    people_before = await conn.fetch("SELECT face_id, person_id FROM listener.faces ORDER BY 1")
    assert await review.reject("bob", face, candidate) is True
    assert await review.reject("bob", face, candidate) is False  # already rejected
    assert await status_of(conn, face, candidate) == "rejected"
    assert await conn.fetch("SELECT face_id, person_id FROM listener.faces ORDER BY 1") == (
        people_before
    )
    assert (await review.counts("bob"))["open_suggestions"] == 0

    face, candidate = seeded.suggestion["alice"]
    await review.accept("alice", face, candidate)
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="was accepted"):
        await review.reject("alice", face, candidate)
    assert await status_of(conn, face, candidate) == "accepted"


async def test_merge_and_rename_people_of_one_owner(
    conn: asyncpg.Connection, pool: asyncpg.Pool, seeded: Seeded
) -> None:
    review = FaceReview(pool)
    # Two people of alice: a1 with border (by accepting), and one holding b, made here (the
    # faces step makes people only from matches, and b matches nothing).
    face, candidate = seeded.suggestion["alice"]
    first = await review.accept("alice", face, candidate)
    lone = await conn.fetchval(
        "INSERT INTO listener.people (owner_id, collection_id) VALUES ('alice', $1) RETURNING id",
        seeded.collection("alice"),
    )
    await conn.execute(
        "UPDATE listener.faces SET person_id = $1 WHERE face_id = $2",
        lone,
        seeded.faces["alice", "b"],
    )
    assert await review.rename("alice", lone, "  Ada Lovelace  ") == "Ada Lovelace"

    bobs_person = await person_of(conn, seeded.faces["bob", "a1"])
    assert bobs_person is not None
    # Another owner's person is refused, and nothing changes.
    with pytest.raises(
        asyncpg.NoDataFoundError, match=f"not among the people of owner 'alice': {bobs_person}"
    ):
        await review.merge("alice", first, [lone, bobs_person])
    assert await person_of(conn, seeded.faces["alice", "b"]) == lone
    with pytest.raises(asyncpg.InvalidParameterValueError, match="into itself"):
        await review.merge("alice", first, [first])

    assert await review.merge("alice", first, [lone]) == 1
    assert await person_of(conn, seeded.faces["alice", "b"]) == first
    assert await conn.fetchval("SELECT count(*) FROM listener.people WHERE id = $1", lone) == 0
    (person,) = await review.people("alice", 10)
    # The unnamed person took the merged person's name.
    assert (person["person_id"], person["name"], person["faces"]) == (first, "Ada Lovelace", 3)
    with pytest.raises(asyncpg.NoDataFoundError):  # retried after it succeeded
        await review.merge("alice", first, [lone])

    assert await review.rename("alice", first, "Ada") == "Ada"
    assert await review.rename("alice", first, "   ") is None
    with pytest.raises(asyncpg.StringDataRightTruncationError):
        await review.rename("alice", first, "x" * 201)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="control characters"):
        await review.rename("alice", first, "Ada\x1b[2J")
    with pytest.raises(asyncpg.NoDataFoundError, match="not among the people of owner 'alice'"):
        await review.rename("alice", bobs_person, "Mallory")
    assert (
        await conn.fetchval("SELECT name FROM listener.people WHERE id = $1", bobs_person) is None
    )


async def test_another_owners_faces_are_out_of_reach(
    conn: asyncpg.Connection, pool: asyncpg.Pool, seeded: Seeded
) -> None:
    review = FaceReview(pool)
    face, candidate = seeded.suggestion["bob"]
    for call in (review.accept, review.reject):
        with pytest.raises(asyncpg.NoDataFoundError, match="among the faces of owner 'alice'"):
            await call("alice", face, candidate)
    with pytest.raises(asyncpg.NoDataFoundError, match="owner NULL"):
        await review.accept(None, face, candidate)
    assert await status_of(conn, face, candidate) == "open"
    assert [p["owner"] for p in await review.people("alice", 10)] == []
    assert {s["source_id"] for s in await review.suggestions("alice", 10)} == {"alice-border"}
    assert await review.suggestions("carol", 10) == []
    with pytest.raises(asyncpg.InvalidParameterValueError, match="limit must be 1 to 1000"):
        await review.suggestions("alice", 0)


async def test_an_app_role_granted_execute_reviews_its_owners_faces(
    database_url: str, conn: asyncpg.Connection, seeded: Seeded
) -> None:
    role = f"app_{secrets.token_hex(4)}"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    parts = urlsplit(database_url)
    app_dsn = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}"))
    face, candidate = seeded.suggestion["bob"]
    try:
        app = await asyncpg.connect(app_dsn)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.fetch("SELECT * FROM listener.open_face_suggestions('bob')")
            # The grants docs/reference/sql-functions.md gives.
            await conn.execute(
                f"GRANT USAGE ON SCHEMA listener TO {role}; GRANT EXECUTE ON FUNCTION "
                "listener.face_counts(text), listener.face_people(text, integer, integer), "
                "listener.open_face_suggestions(text, integer, integer), "
                "listener.accept_suggestion(text, text, text), "
                "listener.reject_suggestion(text, text, text), "
                "listener.merge_people(text, bigint, bigint[]), "
                f"listener.rename_person(text, bigint, text) TO {role}"
            )
            (row,) = await app.fetch("SELECT * FROM listener.open_face_suggestions('bob', 10)")
            assert (row["face_id"], row["candidate_face_id"]) == (face, candidate)
            person = await app.fetchval(
                "SELECT listener.accept_suggestion('bob', $1, $2)", face, candidate
            )
            assert person == await person_of(conn, face) and person is not None
            assert await app.fetchval("SELECT listener.rename_person('bob', $1, 'Bo')", person)
            counts = await app.fetchrow("SELECT * FROM listener.face_counts('bob')")
            assert dict(counts) == {
                "people": 1,
                "faces": 3,
                "unassigned": 0,
                "open_suggestions": 0,
            }
            # The role reaches listener's rows only through the functions, for the owner given.
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.fetch("SELECT * FROM listener.faces")
            with pytest.raises(asyncpg.NoDataFoundError):
                await app.fetchval("SELECT listener.rename_person('alice', $1, 'x')", person)
        finally:
            await app.close()
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def face_effect(
    collection: str, face_id: str, decision: str, matched: str, similarity: float
) -> str:
    """A faces step's effect for one face of alice, as the provider returns it."""
    return json.dumps(
        {
            "collection_id": collection,
            "faces": [
                {
                    "face_id": face_id,
                    "bounding_box": {},
                    "confidence": 99.0,
                    "decision": decision,
                    "matched_face_id": matched,
                    "similarity": similarity,
                }
            ],
        }
    )


async def test_faces_steps_wait_for_a_merge_and_land_in_the_merged_person(
    database_url: str, conn: asyncpg.Connection, pool: asyncpg.Pool, seeded: Seeded
) -> None:
    """Two jobs store faces matched to a person while a merge deletes it: a face assigned to
    it and a face suggested for it. Both wait for the merge, then name the person merged
    into: neither loses its person (faces.person_id is ON DELETE SET NULL) nor fails its step
    (a suggestion's person_id is a foreign key)."""
    review = FaceReview(pool)
    face, candidate = seeded.suggestion["alice"]
    into = await review.accept("alice", face, candidate)
    collection = seeded.collection("alice")
    merged = await conn.fetchval(
        "INSERT INTO listener.people (owner_id, collection_id) VALUES ('alice', $1) RETURNING id",
        collection,
    )
    known = seeded.faces["alice", "b"]
    await conn.execute("UPDATE listener.faces SET person_id = $1 WHERE face_id = $2", merged, known)
    save = "SELECT listener.apply_face_effects(NULL, $1, $2, 'alice', $3)"
    merging = await asyncpg.connect(database_url)
    try:
        async with merging.transaction():
            await merging.fetchval(
                "SELECT listener.merge_people('alice', $1, $2::bigint[])", into, [merged]
            )
            saves = [
                asyncio.create_task(
                    pool.fetchval(
                        save,
                        TABLE,
                        "alice-new",
                        face_effect(collection, "new", "assigned", known, 99),
                    )
                ),
                asyncio.create_task(
                    pool.fetchval(
                        save,
                        TABLE,
                        "alice-near",
                        face_effect(collection, "near", "suggested", known, 90),
                    )
                ),
            ]
            for _ in range(250):
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%apply_face_effects%' AND datname = current_database()"
                )
                if waiting == 2:
                    break
                await asyncio.sleep(0.02)
            assert waiting == 2 and not any(t.done() for t in saves)
        assigned, suggested = [json.loads(r) for r in await asyncio.gather(*saves)]
    finally:
        await merging.close()
    assert (assigned, suggested) == ({"new": into}, {"near": None})
    assert await person_of(conn, "new") == into == await person_of(conn, known)
    assert (
        await conn.fetchval(
            "SELECT person_id FROM listener.face_suggestions WHERE face_id = 'near'"
        )
        == into
    )


async def test_status_shows_the_review_work_waiting(
    conn: asyncpg.Connection, pool: asyncpg.Pool, seeded: Seeded
) -> None:
    doc = await queue_status(Queries(pool), None)
    assert doc["face_suggestions_open"] == 2
    assert doc["face_suggestions_by_owner"] == [
        {"owner": "alice", "suggestions": 1},
        {"owner": "bob", "suggestions": 1},
    ]
    page = render(doc)
    assert 'id="face-suggestions-open" data-value="2"' in page
    assert '<tr data-owner="bob" data-suggestions="1">' in page
    await FaceReview(pool).reject("bob", *seeded.suggestion["bob"])
    doc = await queue_status(Queries(pool), None)
    assert doc["face_suggestions_open"] == 1
    assert doc["face_suggestions_by_owner"] == [{"owner": "alice", "suggestions": 1}]


async def test_the_review_counters_stay_exact(
    conn: asyncpg.Connection, pool: asyncpg.Pool, seeded: Seeded
) -> None:
    """Status reads open suggestions from counters kept by statement triggers: they match a
    count of the suggestions after every kind of change, folded or not."""
    queries = Queries(pool)
    review = FaceReview(pool)

    async def check() -> None:
        rows = await conn.fetch(
            "SELECT owner_id AS owner, count(*) AS n FROM listener.face_suggestions "
            "WHERE status = 'open' GROUP BY 1"
        )
        expected = {r["owner"]: r["n"] for r in rows}
        for fold in (False, True):
            if fold:
                await queries.roll_up_face_review_counts()
            total, by_owner = await queries.face_review_waiting(100)
            assert {r["owner"]: r["suggestions"] for r in by_owner} == expected
            assert total == sum(expected.values())

    await check()
    # More suggestions in one statement, for three owners, one of them NULL.
    await conn.execute(
        "INSERT INTO listener.faces (face_id, collection_id, owner_id, source_table, source_id) "
        "SELECT 'f' || i, 'c', CASE WHEN i % 3 = 0 THEN NULL ELSE 'o' || (i % 3) END, 't', "
        "i::text FROM generate_series(1, 30) i"
    )
    await conn.execute(
        "INSERT INTO listener.face_suggestions "
        "(face_id, candidate_face_id, similarity, owner_id) "
        "SELECT face_id, 'f1', 85, owner_id FROM listener.faces WHERE collection_id = 'c'"
    )
    await check()
    await review.accept("alice", *seeded.suggestion["alice"])
    await review.reject("bob", *seeded.suggestion["bob"])
    await review.reject(None, "f3", "f1")
    await check()
    await conn.execute(  # a face deleted: its suggestions go by cascade
        "DELETE FROM listener.faces WHERE face_id IN ('f1', 'f2', 'f4')"
    )
    await check()
    await conn.execute("UPDATE listener.face_suggestions SET status = 'open'")  # reopened
    await check()
    await conn.execute("TRUNCATE listener.face_suggestions")
    await check()
    total, _ = await queries.face_review_waiting(100)
    assert total == 0


async def test_cli_lists_and_decides(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str], seeded: Seeded
) -> None:
    env = env_for_subprocess
    face, candidate = seeded.suggestion["bob"]

    listed = cli(env, "faces", "suggestions")
    assert listed.returncode == 0, listed.stderr
    assert "open suggestions, most similar first" in listed.stdout
    assert face in listed.stdout and "bob-border" in listed.stdout and "alice" in listed.stdout
    one = json.loads(cli(env, "faces", "suggestions", "--owner", "bob", "--json").stdout)
    assert [(s["face_id"], s["candidate_face_id"]) for s in one["suggestions"]] == [
        (face, candidate)
    ]

    people = cli(env, "faces", "people")
    assert people.returncode == 0, people.stderr
    assert "faces per owner" in people.stdout
    counts = json.loads(cli(env, "faces", "people", "--json").stdout)["counts"]
    assert {
        c["owner"]: (c["people"], c["faces"], c["unassigned"], c["open_suggestions"])
        for c in counts
    } == {"alice": (0, 3, 3, 1), "bob": (1, 3, 1, 1)}

    wrong = cli(env, "faces", "accept", face, candidate, "--owner", "alice")
    assert wrong.returncode == 2 and "among the faces of owner 'alice'" in wrong.stderr
    missing = cli(env, "faces", "accept", "no-such-face", candidate)
    assert missing.returncode == 2 and "no face no-such-face" in missing.stderr

    accepted = cli(env, "faces", "accept", face, candidate)
    assert accepted.returncode == 0, accepted.stderr
    person = await person_of(conn, face)
    assert person is not None and f"face {face} is in person {person}" in accepted.stdout

    alice_face, alice_candidate = seeded.suggestion["alice"]
    rejected = cli(env, "faces", "reject", alice_face, alice_candidate, "--json")
    assert json.loads(rejected.stdout)["rejected"] is True

    renamed = cli(env, "faces", "rename", str(person), "[bold]Bo[/bold]")
    assert renamed.returncode == 0 and "is now named [bold]Bo[/bold]" in renamed.stdout
    listing = cli(env, "faces", "people", "--owner", "bob")
    assert "[bold]Bo[/bold]" in listing.stdout and "public.images bob-" in listing.stdout

    other = await conn.fetchval(
        "INSERT INTO listener.people (owner_id, collection_id) VALUES ('bob', $1) RETURNING id",
        seeded.collection("bob"),
    )
    merged = cli(env, "faces", "merge", str(person), str(other))
    assert merged.returncode == 0, merged.stderr
    assert f"merged 1 people into person {person}: 0 faces moved" in merged.stdout
    alices = await conn.fetchval(
        "INSERT INTO listener.people (owner_id, collection_id) VALUES ('alice', $1) RETURNING id",
        seeded.collection("alice"),
    )
    across = cli(env, "faces", "merge", str(person), str(alices))
    assert across.returncode == 2 and f"not among the people of owner 'bob': {alices}" in (
        across.stderr
    )

    status = cli(env, "status")
    assert status.returncode == 0, status.stderr
    assert "faces to review: 0 open suggestions" in status.stdout
