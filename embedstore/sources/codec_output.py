"""What readers and codecs print while one file is read, caught so it stays off the terminal.

pydicom reports odd values as Python warnings; the C codecs behind it (libjpeg, OpenJPEG, GDCM)
write straight to file descriptor 2, past `sys.stderr`. Both would interleave with the progress
display, one line per odd file of a large archive. Caught per file, the text goes into that file's
failure message when it fails, and is counted in the run's summary when the file is embedded.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

STDERR_FD = 2


@dataclass
class CodecOutput:
    lines: list[str] = field(default_factory=list)  # warnings first, then what was written to stderr

    def __bool__(self) -> bool:
        return bool(self.lines)

    def text(self) -> str:
        return "; ".join(self.lines)


def with_output(message: str, output: CodecOutput) -> str:
    """A failure message followed by what the codecs said about the file."""
    return f"{message} [codec output: {output.text()}]" if output else message


@contextmanager
def captured_output() -> Iterator[CodecOutput]:
    """Python warnings and file-descriptor-2 output of the block, collected in the yielded
    CodecOutput (filled in when the block ends, also when it raises)."""
    output = CodecOutput()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _stderr_into(output):
                yield output
        finally:
            output.lines[:0] = [f"{w.category.__name__}: {w.message}" for w in caught]


@contextmanager
def _stderr_into(output: CodecOutput) -> Iterator[None]:
    """Descriptor 2 pointed at a temporary file for the block, and always pointed back."""
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()  # text written before the block stays out of it
        saved = os.dup(STDERR_FD)
        os.dup2(sink.fileno(), STDERR_FD)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, STDERR_FD)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            output.lines.extend(line.strip() for line in text.splitlines() if line.strip())
