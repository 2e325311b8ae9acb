"""Process-level settings: which malloc is loaded, a re-exec under jemalloc for CPU runs, and how a
torchrun worker ends.

With glibc's malloc, CPU training steps of the larger models sometimes take several times longer than
usual (the large activation buffers are returned to the OS and faulted back in, step after step);
jemalloc with page decay off keeps freed pages for reuse and gives stable step times.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
"""jemalloc options: never return freed pages to the OS (memory stays at the run's high-water mark)."""
_GUARD = "SIMMIM_REEXEC"  # set in the re-executed process so that it does not try again
OPT_OUT = "SIMMIM_NO_JEMALLOC"
"""Set to 1 to keep the allocator the process started with."""
_ALLOCATORS = {"libjemalloc": "jemalloc", "libtcmalloc": "tcmalloc", "libmimalloc": "mimalloc"}


def find_jemalloc() -> str | None:
    """Path of an installed libjemalloc.so.2 (Debian's libjemalloc2 and the usual prefixes)."""
    patterns = ("/usr/lib/*-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
    return next((path for pattern in patterns for path in sorted(glob.glob(pattern))), None)


def loaded_allocator(maps: str = "/proc/self/maps") -> str:
    """The malloc this process runs with, told from the shared objects mapped into it:
    'jemalloc', 'tcmalloc', 'mimalloc', or 'glibc malloc' (also where /proc is not readable)."""
    try:
        with open(maps) as f:
            mapped = f.read()
    except OSError:
        return "glibc malloc"
    return next((name for lib, name in _ALLOCATORS.items() if lib in mapped), "glibc malloc")


def allocator_description() -> str:
    """The allocator with its options, e.g. 'jemalloc (dirty_decay_ms:-1,muzzy_decay_ms:-1)'."""
    name = loaded_allocator()
    conf = os.environ.get("MALLOC_CONF") if name == "jemalloc" else None
    return f"{name} ({conf})" if conf else name


def maybe_reexec_with_jemalloc() -> None:
    """Restarts the current command with jemalloc preloaded (decay off) when it is installed, not
    loaded yet, and not opted out of with SIMMIM_NO_JEMALLOC=1; otherwise returns and changes nothing.
    Call it first thing in a CLI entry point: everything before it runs twice."""
    if (sys.platform != "linux" or os.environ.get(_GUARD) or os.environ.get(OPT_OUT) == "1"
            or loaded_allocator() != "glibc malloc"):
        return
    library = find_jemalloc()
    if library is None:
        return
    env = dict(os.environ, **{_GUARD: "1"})
    env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD")]))
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps `-m module` and the interpreter's own flags, which argv drops
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def is_torchrun_worker() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_worker(status: int) -> NoReturn:
    """Ends a torchrun worker whose work is done without finalizing the interpreter. gloo's worker
    threads may still be freeing a finished collective's tensors (DCP's and gather_objects'
    all-gathers hold Python tensors), which takes the GIL; during finalization a thread asking for it
    is made to exit, and exiting from inside that C++ frame aborts the process (SIGABRT after a
    complete run, now and then in two-process FSDP runs with sharded checkpoints: docs/kernels.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_local_torchrun(processes: int, target: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`processes` CPU workers on this machine under `python -m torch.distributed.run`, each running
    `target` (a script and its arguments, or -m MODULE ...) with one torch thread and this package
    importable; rendezvous on a free loopback port. Output captured as text."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(port), *target]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
