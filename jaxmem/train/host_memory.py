"""The host memory a run may use: the smallest of the host's available memory (MemAvailable),
the limit of the memory cgroup the process runs in (a container's or a SLURM job's) minus what
that cgroup already uses, and an explicit --host-memory; shared evenly by the run's processes
on the host.

In a container or a batch job /proc/meminfo shows the whole host, not the limit the kernel
enforces, so a plan from MemAvailable alone gets the run OOM-killed. Every file is read under a
`root` so that tests can fake /proc and /sys.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jaxmem.sizes import parse_bytes

# A cgroup limit at or above this is "no limit" (cgroup v1 writes 2^63 rounded down to a page).
UNLIMITED = 2**60
# (file name of the limit, of the usage, the memory.stat line of reclaimable page cache)
CGROUP_FILES = {"v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
                "v2": ("memory.max", "memory.current", "inactive_file")}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Bytes of memory a process may use, and where the number came from (for metrics.json)."""

    bytes: int
    source: str


def host_budget(explicit: str | None = None, root: str = "/",
                environ: dict | None = None) -> Budget:
    """This process's share of the smallest of MemAvailable, the cgroup limits minus usage
    and `explicit` (--host-memory, the most the run may hold) minus what the process holds
    (VmRSS), over the processes on the host: the bytes it may still add."""
    candidates = [available_memory(root), *cgroup_budgets(root)]
    if explicit is not None:  # the most the run may hold: what it holds now is spent
        in_use = kib_field(os.path.join(root, "proc/self/status"), "VmRSS:") or 0
        candidates.append(Budget(max(0, parse_bytes(explicit) - in_use), "--host-memory"))
    smallest = min(candidates, key=lambda b: b.bytes)
    processes = processes_per_host(os.environ if environ is None else environ)
    if processes == 1:
        return smallest
    return Budget(smallest.bytes // processes,
                  f"{smallest.source} shared by {processes} processes on the host")


def processes_per_host(environ) -> int:
    """Processes of this job on this host (1 where nothing says): LOCAL_WORLD_SIZE (torchrun-style
    launchers), else SLURM's tasks on this node: this node's entry (by SLURM_NODEID) of the step's
    or the job's tasks per node (SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE: "2(x3),1" is 2
    tasks on each of nodes 0-2 and 1 on node 3), else --ntasks-per-node (SLURM_NTASKS_PER_NODE),
    else SLURM_NTASKS over SLURM_NNODES (or SLURM_JOB_NUM_NODES) rounded up; never fewer than
    SLURM_LOCALID + 1 (this task's index on the node)."""
    if count := _leading_int(environ.get("LOCAL_WORLD_SIZE")):
        return count
    node = _leading_int(environ.get("SLURM_NODEID"), minimum=0) or 0
    nodes = _leading_int(environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES"))
    tasks = _leading_int(environ.get("SLURM_NTASKS"))
    count = (_node_entry(environ.get("SLURM_STEP_TASKS_PER_NODE"), node)
             or _node_entry(environ.get("SLURM_TASKS_PER_NODE"), node)
             or _leading_int(environ.get("SLURM_NTASKS_PER_NODE"))
             or (math.ceil(tasks / nodes) if tasks and nodes else None) or 1)
    return max(count, 1 + (_leading_int(environ.get("SLURM_LOCALID"), minimum=0) or 0))


def _leading_int(text: str | None, minimum: int = 1) -> int | None:
    """The number a variable starts with ("4" and "4(x2)" give 4), if at least `minimum`."""
    match = re.match(r"\s*(\d+)", text or "")
    return int(match.group(1)) if match and int(match.group(1)) >= minimum else None


def _node_entry(tasks_per_node: str | None, node: int) -> int | None:
    """Node `node`'s count in SLURM's compressed tasks-per-node list ("2(x3),1"), if it has one."""
    for entry in (tasks_per_node or "").split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", entry)
        if not match:
            return None
        repeat = int(match.group(2) or 1)
        if node < repeat:
            return int(match.group(1)) or None
        node -= repeat
    return None


def available_memory(root: str = "/") -> Budget:
    """The host's available memory (MemAvailable: free plus reclaimable cache), or, where
    /proc/meminfo is missing, the physical memory."""
    available = kib_field(os.path.join(root, "proc/meminfo"), "MemAvailable:")
    if available is None:
        return Budget(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                      "physical memory")
    return Budget(available, "MemAvailable")


def kib_field(path: str, name: str) -> int | None:
    """The bytes of a 'Name:  123 kB' line of a /proc file, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_budgets(root: str = "/") -> list[Budget]:
    """Limit minus usage of every memory cgroup (v1 and v2) from the process's own up to the
    hierarchy's root that has a limit; usage leaves out reclaimable page cache (inactive files).
    Empty where no cgroup sets a limit or the files are missing."""
    budgets = []
    for version, directory, top in cgroup_dirs(root):
        limit_name, usage_name, cache_name = CGROUP_FILES[version]
        while True:
            limit = _read_int(os.path.join(directory, limit_name))
            usage = _read_int(os.path.join(directory, usage_name))
            if limit is not None and limit < UNLIMITED and usage is not None:
                cache = _stat_field(os.path.join(directory, "memory.stat"), cache_name)
                shown = "/" + os.path.relpath(directory, root)
                budgets.append(Budget(max(0, limit - max(0, usage - cache)),
                                      f"cgroup {version} {os.path.normpath(shown)}"))
            if os.path.normpath(directory) == os.path.normpath(top):
                break
            directory = os.path.dirname(directory)
    return budgets


def cgroup_dirs(root: str = "/") -> list[tuple[str, str, str]]:
    """[(version, the process's memory cgroup directory, its hierarchy's mount point)] from
    /proc/self/cgroup and /proc/self/mountinfo (else the usual /sys/fs/cgroup layout)."""
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounts = _cgroup_mounts(root)
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            version = "v2"
        elif "memory" in controllers.split(","):
            version = "v1"
        else:
            continue
        mount_root, mount_point = mounts.get(version, ("/", _DEFAULT_MOUNTS[version]))
        relative = path[len(mount_root):] if path.startswith(mount_root) else path
        top = os.path.join(root, mount_point.lstrip("/"))
        found.append((version, os.path.join(top, relative.lstrip("/")).rstrip("/"),
                      top.rstrip("/")))
    return found


_DEFAULT_MOUNTS = {"v1": "/sys/fs/cgroup/memory", "v2": "/sys/fs/cgroup"}


def _cgroup_mounts(root: str) -> dict[str, tuple[str, str]]:
    """{version: (root of the hierarchy in the mount, mount point)} of the memory v1 and the
    v2 cgroup hierarchies in /proc/self/mountinfo."""
    mounts = {}
    try:
        with open(os.path.join(root, "proc/self/mountinfo")) as f:
            lines = f.read().splitlines()
    except OSError:
        return mounts
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, extra = before.split(), after.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        unescaped = [_unescape(fields[3]), _unescape(fields[4])]
        if extra[0] == "cgroup2":
            mounts.setdefault("v2", tuple(unescaped))
        elif extra[0] == "cgroup" and "memory" in extra[2].split(","):
            mounts.setdefault("v1", tuple(unescaped))
    return mounts


def _unescape(field: str) -> str:
    """A mountinfo path with its octal escapes (\\040 for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read_int(path: str) -> int | None:
    """The number in a cgroup file; 'max' reads as UNLIMITED; None where the file is missing."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return UNLIMITED if text == "max" else int(text)


def _stat_field(path: str, name: str) -> int:
    """The value of line `name` of a memory.stat file (0 where missing)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except OSError:
        pass
    return 0
