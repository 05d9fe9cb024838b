"""The Files API's store: uploaded files and the output and error files batches write.

Source: OpenAI API reference, "Files". A file is kept as its bytes (``contents``) and its File
object (``objects``), both by id.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import BodyPartReader, web

from listener.testing.openai_fake.errors import ApiError, invalid, not_found

# Batch files are kept 30 days ("Batch API" guide).
BATCH_FILE_TTL_S = 30 * 24 * 3600


class FileStore:
    """Files by id: ``contents`` (the bytes) and ``objects`` (the File objects)."""

    def __init__(self) -> None:
        self.contents: dict[str, bytes] = {}
        self.objects: dict[str, dict[str, Any]] = {}

    def store(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        """Keep ``data`` as a new file; return its File object."""
        created_at = int(time.time())
        file_object: dict[str, Any] = {
            "id": f"file-{uuid.uuid4().hex[:22]}",
            "object": "file",
            "bytes": len(data),
            "created_at": created_at,
            "expires_at": (
                created_at + BATCH_FILE_TTL_S if purpose in ("batch", "batch_output") else None
            ),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        self.contents[file_object["id"]] = data
        self.objects[file_object["id"]] = file_object
        return file_object

    def get(self, file_id: str, param: str | None = None) -> dict[str, Any]:
        """The File object of ``file_id``. Raises ``ApiError`` 404 for an unknown id."""
        if file_id not in self.objects:
            raise not_found("File", file_id, param)
        return self.objects[file_id]


async def read_upload(request: web.Request) -> tuple[str, bytes, str]:
    """The ``(filename, data, purpose)`` of a ``POST /v1/files`` (multipart ``file`` +
    ``purpose``). Raises ``ApiError`` (400) when the body is not multipart or lacks one."""
    if request.content_type != "multipart/form-data":
        raise ApiError(
            400,
            f"Invalid Content-Type header ({request.content_type}), expected multipart/form-data.",
        )
    fields: dict[str, str] = {}
    upload: tuple[str, bytes] | None = None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if isinstance(part, BodyPartReader) and part.name == "file":
            upload = (part.filename or "upload", await part.read())
        elif isinstance(part, BodyPartReader) and part.name:
            fields[part.name] = await part.text()
        else:
            await part.release()
    for name, value in (("file", upload), ("purpose", fields.get("purpose"))):
        if value is None:
            raise invalid(
                f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
            )
    assert upload is not None
    filename, data = upload
    return filename, data, fields["purpose"]
