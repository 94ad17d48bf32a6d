"""The run manifest: one JSON line per finished job, safe against a kill at any moment.

* A line is appended with ONE ``write`` on an unbuffered O_APPEND file, then ``fsync``: a kill
  leaves either the whole line or (power loss mid-write) a partial last line, never a broken line
  in the middle.
* Readers ignore a trailing line without its newline; a writer cuts such a tail off before its
  first append, so the next line starts clean.
* Every process writes its own file (``manifest.jsonl``, or ``manifest.shard-I-of-N.jsonl`` under
  sharding) and holds an exclusive lock on it, so two processes never interleave in one file.
  The run's manifest is the union of ``manifest*.jsonl``; when a job appears more than once (its
  image was deleted and it ran again), the last line counts.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from loracompose.errors import UserError

MANIFEST_GLOB = "manifest*.jsonl"


def manifest_name(shard_index: int, shard_count: int) -> str:
    return "manifest.jsonl" if shard_count == 1 else f"manifest.shard-{shard_index}-of-{shard_count}.jsonl"


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The complete records of one manifest file (a trailing partial line is skipped)."""
    data = Path(path).read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"manifest {path} line {number} is not JSON; the file was edited by hand: "
                            "fix or remove that line") from None


def read_manifest(run_dir: Path) -> dict[str, dict[str, Any]]:
    """job id -> its record, over every manifest file of the run (the last record of a job wins)."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(run_dir).glob(MANIFEST_GLOB)):
        for record in read_lines(path):
            records.pop(record["job_id"], None)
            records[record["job_id"]] = record
    return records


class ManifestWriter:
    """Appends records to this process's manifest file; use as a context manager (holds the lock)."""

    def __init__(self, path: Path, command: str = "bench"):
        self.path = Path(path)
        self.command = command  # who writes the file, for the message when another process holds it
        self._file: BinaryIO | None = None

    @property
    def _open_file(self) -> BinaryIO:
        if self._file is None:
            raise RuntimeError("ManifestWriter used outside its `with` block")
        return self._file

    def __enter__(self) -> ManifestWriter:
        self._file = handle = open(self.path, "ab", buffering=0)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            hint = "or give this one another --shard" if self.command == "bench" else "and rerun"
            raise UserError(f"another {self.command} process is writing {self.path}; "
                            f"wait for it to finish {hint}") from None
        self._cut_partial_tail()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._open_file.close()  # closing releases the lock

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line: a single write, then fsync."""
        line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        written = self._open_file.write(line)
        if written != len(line):  # a full disk; never leave the half line for the next append
            self._cut_partial_tail()
            raise UserError(f"manifest {self.path}: could not write a whole line (disk full?); free space and rerun")
        os.fsync(self._open_file.fileno())

    def _cut_partial_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(self.path, data.rfind(b"\n") + 1)
            os.fsync(self._open_file.fileno())
