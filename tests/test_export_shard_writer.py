"""ShardWriter: a name written twice is refused whether the first copy is pending or already in a
flushed shard; the duplicate check is a set lookup (a list scan per tensor was quadratic in the
~10^5 output names of a DeepSeek-V3 export)."""

import pytest
import torch

from megatron_qat.export.checkpoint import ShardWriter
from megatron_qat.export.codec import ExportError


def test_duplicate_refused_pending_and_flushed(tmp_path):
    w = ShardWriter(str(tmp_path), max_shard_bytes=8)
    w.add("a", torch.zeros(8, dtype=torch.uint8))
    w.add("b", torch.zeros(8, dtype=torch.uint8))  # flushes "a" into part-00000
    with pytest.raises(ExportError, match="a: written twice"):
        w.add("a", torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ExportError, match="b: written twice"):
        w.add("b", torch.zeros(1, dtype=torch.uint8))
    assert w.finish() == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}

