"""`[batches]`: how big a batch may be and how much of the box it keeps busy."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from node.config.base import _Section


class BatchesSection(_Section):
    """OpenAI's Files and Batches API (`/v1/files`, `/v1/batches`)."""

    # Largest uploaded file, in bytes; larger uploads get 413, and a batch over it fails validation.
    max_file_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 16 * 1024 * 1024
    # Most requests (lines) in one batch.
    max_lines: Annotated[int, Field(ge=1, le=1_000_000)] = 50_000
    # Uploads read into memory at once, node-wide; past it an upload gets 429.
    upload_slots: Annotated[int, Field(ge=1, le=64)] = 4
    # Lines of one batch sent at once; they wait in the model's queue at batch priority.
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 8
