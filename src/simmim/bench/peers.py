"""The peers' environment: mmpretrain lives in a venv of its own (`make bench-peers` builds `.venv-peers`),
so that the project never depends on it. When that venv exists the bench measures each comparison row
in a process of its python, with this package first on its path: ours, HF and mmpretrain timed in one
process, alternated.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

VENV = ".venv-peers"
ENTRY = "import sys; from simmim.bench.peers import main; main(*sys.argv[1:])"
T = TypeVar("T")


def peers_python(venv: str | Path = VENV) -> Path | None:
    """The python of the peers' venv, None where it was not built."""
    python = Path(venv) / "bin" / "python"
    return python if python.exists() else None


def has_mmpretrain() -> bool:
    try:
        import mmpretrain  # noqa: F401
    except ImportError:
        return False
    return True


def in_peers(python: Path) -> Callable[..., T]:
    """A row runner (as `run.isolated`) calling fn in a fresh process of the peers' python, with this
    process's torch threads and environment (its allocator too) and this package first on PYTHONPATH."""
    source = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}

    def run_there(fn: Callable[..., T], *args, **kwargs) -> T:
        with tempfile.TemporaryDirectory() as tmp:
            call, result = Path(tmp, "call.pkl"), Path(tmp, "result.pkl")
            call.write_bytes(pickle.dumps((torch.get_num_threads(), fn, args, kwargs)))
            done = subprocess.run([str(python), "-c", ENTRY, str(call), str(result)], env=env)
            if done.returncode:
                raise RuntimeError(f"the row in {python} failed (exit status {done.returncode})")
            return pickle.loads(result.read_bytes())

    return run_there


def main(call: str, result: str) -> None:
    """In the peers' python: unpickles (threads, fn, args, kwargs) from `call`, pickles fn's result into `result`."""
    threads, fn, args, kwargs = pickle.loads(Path(call).read_bytes())
    torch.set_num_threads(threads)
    Path(result).write_bytes(pickle.dumps(fn(*args, **kwargs)))
