"""Outputs that appear whole or not at all: the one JSON writer and the one output directory.

Both create new files and directories with the usual permissions, ``0o666`` / ``0o777`` masked by
the process umask (``tempfile.mkstemp`` / ``mkdtemp`` would make them 0600 / 0700, unreadable by a
serving process of another user), and both hold SIGINT / SIGTERM / SIGHUP back while they create,
publish or remove something (:func:`megatron_qat.tools.signals.deferred`), so a signal can never
leave a temporary file or directory behind; SIGKILL and power loss can.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil

from . import signals
from .errors import ToolError


def umask() -> int:
    """The process umask (read by setting it, then restored)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str, doc, *, indent: int = 2) -> None:
    """Write ``doc`` as strict JSON (no NaN / Infinity literals) to ``path``: a temporary file in the
    same directory, then ``os.replace``, so readers see the old file or the whole new one.

    Raises OSError (disk full, no permission, ...) with the temporary file removed."""
    text = json.dumps(doc, indent=indent, allow_nan=False) + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{secrets.token_hex(4)}")
    with signals.deferred():  # short: the whole write is one critical section
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def probe_writable(directory: str) -> str | None:
    """Why no file can be created in ``directory`` (``None``: it can): creates and removes one, as
    :func:`write_json` would (``os.access`` says yes to root and on read-only mounts)."""
    tmp = os.path.join(directory, f".probe-{secrets.token_hex(4)}")
    with signals.deferred():
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        os.unlink(tmp)
    return None


class OutputExists(ToolError):
    """The output path exists already, or appeared while the command ran (a concurrent writer)."""


class AtomicDirectory:
    """``with AtomicDirectory(dst, flag="--out") as tmp:`` write the output into ``tmp``
    (``DST.partial-<random>``, a sibling of ``dst``).

    When the block ends normally, ``tmp`` is renamed to ``dst``; when it ends by ANY exception
    (a refused tensor, an OSError such as a full disk, a ``KeyboardInterrupt``, an
    :class:`~megatron_qat.tools.signals.Interrupted`), ``tmp`` is removed and the exception goes on.
    If ``dst`` was created by someone else while the block ran (two exports to one ``--out``),
    ``tmp`` is removed and :class:`OutputExists` says so: ``dst`` is the other writer's.

    Refused up front (:class:`ToolError`): ``dst`` exists, its parent does not exist or is not a
    directory."""

    def __init__(self, dst: str, flag: str = "--out"):
        self.given, self.flag = dst, flag
        self.dst = os.path.abspath(dst)
        self.tmp: str | None = None
        parent = os.path.dirname(self.dst)
        if os.path.lexists(self.dst):
            raise OutputExists(f"{flag} {dst}: already exists; choose a new {flag} directory (nothing written)")
        if not os.path.exists(parent):
            raise ToolError(f"{flag} {dst}: parent directory {parent} does not exist")
        if not os.path.isdir(parent):
            raise ToolError(f"{flag} {dst}: {parent} is not a directory")

    def __enter__(self) -> str:
        with signals.deferred():  # the directory exists only once self.tmp names it
            while True:
                tmp = f"{self.dst}.partial-{secrets.token_hex(4)}"
                try:
                    os.mkdir(tmp, 0o777)  # the umask applies
                except FileExistsError:
                    continue
                self.tmp = tmp
                return tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        with signals.deferred():
            if exc_type is not None:
                self._remove()
                return
            if os.path.lexists(self.dst):
                self._remove()
                raise self._taken()
            try:
                os.rename(self.tmp, self.dst)  # replaces nothing: dst does not exist (or is non-empty: error)
            except OSError:
                self._remove()
                if os.path.lexists(self.dst):
                    raise self._taken() from None
                raise

    def _remove(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _taken(self) -> OutputExists:
        return OutputExists(
            f"{self.flag} {self.given}: another process created it while this export ran; nothing of this export was "
            f"written (its temporary {os.path.basename(self.tmp)} was removed; {self.given} is the other process's)"
        )
