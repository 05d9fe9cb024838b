"""``listener faces ...``: the operator's review of faces, over the app's SQL functions.

``people`` and ``suggestions`` list one owner's (``--owner``) or every owner's; ``accept``,
``reject``, ``merge`` and ``rename`` act on the owner of the face or person named, or check it
is ``--owner``'s. Every value printed goes through ``listener.cli.render.shown``;
the tables are drawn there.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from listener.app_side.face_review import FaceReview, NotFound
from listener.cli.common import UserError, load_settings, open_pool, run_command
from listener.cli.render import (
    console,
    face_counts_table,
    people_table,
    print_json,
    shown,
    suggestions_table,
)

faces_app = typer.Typer(
    name="faces",
    help="Faces per owner: people, suggestions to review (80-95% similar), accept, reject, "
    "merge, rename.",
    no_args_is_help=True,
)

OwnerOption = Annotated[
    str | None, typer.Option(help="Only this owner's rows (default: every owner).")
]
CheckOwnerOption = Annotated[
    str | None,
    typer.Option(help="Refuse unless the rows are this owner's (default: their owner)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@faces_app.command()
def people(
    owner: OwnerOption = None,
    limit: Annotated[int, typer.Option(help="People listed (1-1000).")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Counts per owner, then people, most faces first.

    Counts: people, faces, faces in no person, open suggestions. Each person is listed with
    a sample face (its most confident) and the row it was found in.
    """
    settings = load_settings()

    async def go() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with open_pool(settings) as pool:
            review = FaceReview(pool)
            if owner is None:
                return (
                    await review.counts_by_owner(limit),
                    await review.people_of_every_owner(limit),
                )
            return [await review.counts(owner)], await review.people(owner, limit)

    counts, found = run_command(go())
    if as_json:
        print_json({"counts": counts, "people": found})
        return
    console.print(face_counts_table(counts))
    console.print(people_table(found, owner is None) if found else "no people yet")


@faces_app.command()
def suggestions(
    owner: OwnerOption = None,
    limit: Annotated[int, typer.Option(help="Suggestions listed (1-1000).")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Open suggestions to review, most similar first.

    Each is a face, the earlier face it resembles (the candidate, 80-95% similar) and the
    candidate's person. Decide with `faces accept` or `faces reject`.
    """
    settings = load_settings()

    async def go() -> list[dict[str, Any]]:
        async with open_pool(settings) as pool:
            review = FaceReview(pool)
            if owner is None:
                return await review.suggestions_of_every_owner(limit)
            return await review.suggestions(owner, limit)

    found = run_command(go())
    if as_json:
        print_json({"suggestions": found})
        return
    if not found:
        console.print("no open suggestions")
        return
    console.print(suggestions_table(found, owner is None))


async def _face_owner(review: FaceReview, face_id: str, owner: str | None) -> str | None:
    if owner is not None:
        return owner
    try:
        return await review.face_owner(face_id)
    except NotFound as error:
        raise UserError(str(error)) from None


async def _person_owner(review: FaceReview, person_id: int, owner: str | None) -> str | None:
    if owner is not None:
        return owner
    try:
        return await review.person_owner(person_id)
    except NotFound as error:
        raise UserError(str(error)) from None


@faces_app.command()
def accept(
    face: Annotated[str, typer.Argument(help="The suggested face (FaceId).")],
    candidate: Annotated[str, typer.Argument(help="The candidate face it resembles.")],
    owner: CheckOwnerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Accept a suggestion: FACE joins the person of CANDIDATE.

    The person is created when neither face had one. The face's other open suggestions are
    closed. Accepting twice changes nothing.
    """
    settings = load_settings()

    async def go() -> int:
        async with open_pool(settings) as pool:
            review = FaceReview(pool)
            return await review.accept(await _face_owner(review, face, owner), face, candidate)

    person = run_command(go())
    if as_json:
        print_json({"face_id": face, "person_id": person})
    else:
        console.print(f"face {shown(face)} is in person {person}")


@faces_app.command()
def reject(
    face: Annotated[str, typer.Argument(help="The suggested face (FaceId).")],
    candidate: Annotated[str, typer.Argument(help="The candidate face it resembles.")],
    owner: CheckOwnerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Reject a suggestion: FACE is not CANDIDATE's person (nothing else changes)."""
    settings = load_settings()

    async def go() -> bool:
        async with open_pool(settings) as pool:
            review = FaceReview(pool)
            return await review.reject(await _face_owner(review, face, owner), face, candidate)

    changed = run_command(go())
    if as_json:
        print_json({"face_id": face, "candidate_face_id": candidate, "rejected": changed})
    else:
        console.print(
            f"rejected: face {shown(face)} is not the person of {shown(candidate)}"
            if changed
            else "that suggestion was already rejected"
        )


@faces_app.command()
def merge(
    into: Annotated[int, typer.Argument(help="The person that stays.")],
    people: Annotated[list[int], typer.Argument(help="People whose faces join INTO.")],
    owner: CheckOwnerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Merge PEOPLE into person INTO (all of one owner).

    Their faces join INTO and they are deleted. INTO keeps its name, or takes the first name
    among PEOPLE when it has none.
    """
    settings = load_settings()

    async def go() -> int:
        async with open_pool(settings) as pool:
            review = FaceReview(pool)
            return await review.merge(await _person_owner(review, into, owner), into, people)

    moved = run_command(go())
    if as_json:
        print_json({"into": into, "merged": people, "faces_moved": moved})
    else:
        console.print(f"merged {len(set(people))} people into person {into}: {moved} faces moved")


@faces_app.command()
def rename(
    person: Annotated[int, typer.Argument(help="A person id.")],
    name: Annotated[str, typer.Argument(help="The name; an empty string removes it.")],
    owner: CheckOwnerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Name PERSON (at most 200 characters; "" removes the name)."""
    settings = load_settings()

    async def go() -> str | None:
        async with open_pool(settings) as pool:
            review = FaceReview(pool)
            return await review.rename(await _person_owner(review, person, owner), person, name)

    stored = run_command(go())
    if as_json:
        print_json({"person_id": person, "name": stored})
    elif stored is None:
        console.print(f"person {person} has no name now")
    else:
        console.print(f"person {person} is now named {shown(stored)}")
