"""The commit a benchmark ran at, for the header every benchmark prints (GPU.md "Numbers that count").

`$FP8LINEAR_COMMIT` wins when set: the working-tree copy on the GPU machine may carry a stale git state
(benchmark headers read an old HEAD there), so the run command passes the commit explicitly. Otherwise
`git rev-parse` in this checkout, with "+dirty" for uncommitted changes to tracked files; "unknown"
without git.
"""

from __future__ import annotations

import os
import subprocess

_HERE = os.path.dirname(os.path.abspath(__file__))


def commit(length: int = 7) -> str:
    explicit = os.environ.get("FP8LINEAR_COMMIT")
    if explicit:
        return explicit
    try:
        head = subprocess.run(["git", "rev-parse", f"--short={length}", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=_HERE).stdout.strip()
        if not head:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=_HERE).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git on the machine is fine
        return "unknown"
