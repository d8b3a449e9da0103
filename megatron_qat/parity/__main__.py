"""``python -m megatron_qat.parity [PATH ...]``: same as ``megatron-qat parity``."""

import sys

from ..cli import console_main

if __name__ == "__main__":
    console_main(["parity", *sys.argv[1:]])
