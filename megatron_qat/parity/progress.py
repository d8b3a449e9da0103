"""Progress on stderr: elements and tensors. tqdm when installed, else a one-line counter.
Disabled with --quiet or when stderr is not a terminal."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total_elements: int, total_tensors: int, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.total_tensors = total_tensors
        self.tensors = 0
        self.elements = 0
        self.total = total_elements
        self._bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # optional dependency: fall back to the plain counter
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total_elements, unit="el", unit_scale=True, file=sys.stderr, dynamic_ncols=True)

    def advance(self, elements: int) -> None:
        self.elements += elements
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(elements)
        else:
            sys.stderr.write(f"\r{self.elements:,}/{self.total:,} elements, tensor {self.tensors}/{self.total_tensors}")
            sys.stderr.flush()

    def tensor_done(self, name: str) -> None:
        self.tensors += 1
        if self.enabled and self._bar is not None:
            self._bar.set_postfix_str(f"tensors {self.tensors}/{self.total_tensors}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
