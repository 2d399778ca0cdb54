"""Where a result came from: slq's version (read from the installed package's metadata), the versions of
the libraries that shaped it, and the git commit of the source tree when there is one."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("slq")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"


def versions() -> dict:
    """Versions of slq, torch, transformers, compressed-tensors and Python."""
    import compressed_tensors
    import torch
    import transformers

    return {
        "slq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "python": platform.python_version(),
    }


def git_commit(cwd: Path | None = None) -> str:
    """HEAD of the git checkout at ``cwd`` (default: this source tree), or "unknown"."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd or Path(__file__).parent, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
