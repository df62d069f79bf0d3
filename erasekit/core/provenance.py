"""The record stamped on every benchmark / evaluation output: date, machine, versions, git commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess


def run_record() -> dict:
    import torch

    from .. import __version__

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.system()}, {device}",
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": version("diffusers"),
        "transformers": version("transformers"), "erasekit": __version__, "git_commit": commit,
    }


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS, where Linux allows it; False otherwise.

    Needed in a child process too: Linux keeps ``ru_maxrss`` across exec, so a child inherits its parent's peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak RSS in MB since :func:`reset_peak_rss` (``VmHWM``; else ``ru_maxrss``, since start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
