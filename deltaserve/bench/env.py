"""What every benchmark report records: card, driver, versions, commit, date and the exact command."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys


def git_commit() -> str:
    """The checkout's commit (``-dirty`` with local edits); ``DELTASERVE_COMMIT`` overrides it, for copies
    of the tree without their git history (the GPU machine)."""
    if os.environ.get("DELTASERVE_COMMIT"):
        return os.environ["DELTASERVE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=__file__.rsplit("/deltaserve/", 1)[0])
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=__file__.rsplit("/deltaserve/", 1)[0])
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    import torch

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    else:
        env["card"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
        env["driver"] = None
    return env


def format_environment(env: dict) -> str:
    keys = ["date", "card", "driver", "cuda", "torch", "triton", "commit", "command"]
    return "\n".join(f"{k}: {env.get(k)}" for k in keys if k in env)
