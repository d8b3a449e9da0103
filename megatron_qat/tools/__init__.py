"""What the two command-line tools (``megatron-qat parity``, ``megatron-qat export``) share, written once:

- :mod:`.errors` -- the error hierarchy and the one exit-code table;
- :mod:`.signals` -- SIGINT / SIGTERM / SIGHUP turned into an exception, so every ``with`` /
  ``finally`` cleans up, and critical sections that defer them;
- :mod:`.atomic` -- the atomic JSON writer and the atomic output directory (umask-honouring,
  removed on any failure or signal, never published over a concurrent writer's output);
- :mod:`.progress` -- the one progress line (a finished line before any error message);
- :mod:`.safetensors_files` -- the one safetensors reader (index, shards, dtype table) and shard
  writer, every failure a one-line error naming the file.

Layering: below :mod:`megatron_qat.layouts`, :mod:`megatron_qat.export` and
:mod:`megatron_qat.parity`; imports nothing of theirs. Importing this package imports no torch.
"""
