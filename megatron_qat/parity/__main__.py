"""``python -m megatron_qat.parity [PATH ...]``: same as ``megatron-qat parity``."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m megatron_qat.parity"))
