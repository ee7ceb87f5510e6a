"""The batch service as the node assembles it: files under data_dir/files, lines through the gateway."""

from __future__ import annotations

from typing import Any

from node.batches.api import BatchApi, UploadGate
from node.batches.files import FileStore
from node.batches.lines import Limits
from node.batches.records import BatchRecord
from node.batches.runner import BatchRunner
from node.batches.service import Batches
from node.gateway.inprocess import batch_executor


def build_batches(config: Any, storage: Any, gateway: Any, keys: Any, quotas: Any,
                  metrics: Any) -> BatchApi:
    """The Files and Batches API over `storage` (SqlStorage: the batch tables are a part of it)."""
    cfg = config.batches
    limits = Limits(cfg.max_file_bytes, cfg.max_lines)
    files = FileStore(config.data_dir / "files")
    lines = metrics.batch_lines

    def model_problem(batch: BatchRecord, model: str) -> str | None:
        """Why the batch's key may not run `model` here, or None."""
        key = keys.get(batch.key_id) if batch.key_id else None
        if config.model(model) is None:
            return f"the model '{model[:256]}' does not exist on this node"
        if key is None or not quotas.allows(key, model):
            return f"this API key may not use model '{model[:256]}'"
        return None

    runner = BatchRunner(storage, files, batch_executor(gateway, keys), limits=limits, model_problem=model_problem,
                         concurrency=cfg.concurrency,
                         on_line=lambda result: lines.labels(result).inc())
    metrics.batch_counts = storage.batch_counts
    batches = Batches(storage, files, runner, limits)
    uploads = UploadGate(cfg.upload_slots, config.node.request_timeout_s + 5)
    return BatchApi(batches, uploads, admit=quotas.admit)
