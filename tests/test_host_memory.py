"""The host memory budget from faked /proc and /sys trees: cgroup v1 and v2 limits, unlimited
and tiny ones, limits on a parent cgroup, container mounts, missing files, --host-memory and
processes sharing the host."""

import os

import pytest

from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.sizes import parse_bytes
from jaxmem.train import host_memory
from jaxmem.train.host_memory import Budget, host_budget

GIB = 2**30
V1_UNLIMITED = "9223372036854771712"
MOUNTS_V1 = ("35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
             "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
MOUNTS_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def write(root, path: str, text: str) -> None:
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as f:
        f.write(text)


def fake_host(root, cgroup: str, mounts: str | None, available_gib: float = 20) -> str:
    """A root with /proc/meminfo, /proc/self/cgroup and (unless None) /proc/self/mountinfo."""
    root = str(root)
    write(root, "proc/meminfo", f"MemTotal: 99999999 kB\nMemAvailable: "
                                f"{int(available_gib * 2**20)} kB\n")
    write(root, "proc/self/cgroup", cgroup)
    if mounts is not None:
        write(root, "proc/self/mountinfo", mounts)
    return root


def v1_group(root, path: str, limit: str, usage: int, inactive: int | None = None) -> None:
    base = os.path.join("sys/fs/cgroup/memory", path.lstrip("/"))
    write(root, f"{base}/memory.limit_in_bytes", limit + "\n")
    write(root, f"{base}/memory.usage_in_bytes", f"{usage}\n")
    if inactive is not None:
        write(root, f"{base}/memory.stat", f"cache 5\ntotal_inactive_file {inactive}\n")


def v2_group(root, path: str, limit: str, usage: int) -> None:
    base = os.path.join("sys/fs/cgroup", path.lstrip("/"))
    write(root, f"{base}/memory.max", limit + "\n")
    write(root, f"{base}/memory.current", f"{usage}\n")


def test_v1_limit_minus_usage_without_reclaimable_cache(tmp_path):
    root = fake_host(tmp_path, "4:memory:/job/step\n3:cpuset:/\n0::/\n", MOUNTS_V1)
    v1_group(root, "/job/step", str(6 * GIB), usage=2 * GIB, inactive=GIB // 2)
    v1_group(root, "/job", V1_UNLIMITED, usage=2 * GIB)
    v1_group(root, "/", V1_UNLIMITED, usage=9 * GIB)
    expected = Budget(6 * GIB - 2 * GIB + GIB // 2, "cgroup v1 /sys/fs/cgroup/memory/job/step")
    assert host_budget(root=root, environ={}) == expected


def test_a_parent_cgroups_limit_applies_when_the_leaf_has_none(tmp_path):
    root = fake_host(tmp_path, "4:memory,hugetlb:/a/b/c\n", MOUNTS_V1)
    v1_group(root, "/a/b/c", V1_UNLIMITED, usage=GIB)
    v1_group(root, "/a/b", str(4 * GIB), usage=3 * GIB)
    v1_group(root, "/a", str(8 * GIB), usage=3 * GIB)
    assert host_budget(root=root, environ={}) == Budget(GIB, "cgroup v1 /sys/fs/cgroup/memory/a/b")


def test_v2_max_and_unlimited(tmp_path):
    root = fake_host(tmp_path, "0::/user.slice/job.scope\n", MOUNTS_V2, available_gib=20)
    v2_group(root, "/user.slice/job.scope", "max", usage=GIB)
    v2_group(root, "/user.slice", str(3 * GIB), usage=GIB)
    parent = Budget(2 * GIB, "cgroup v2 /sys/fs/cgroup/user.slice")
    assert host_budget(root=root, environ={}) == parent
    v2_group(root, "/user.slice", "max", usage=GIB)
    assert host_budget(root=root, environ={}) == Budget(20 * GIB, "MemAvailable")


def test_a_container_sees_its_cgroup_at_the_mount_point(tmp_path):
    """Inside a container the hierarchy's root in mountinfo is the container's cgroup."""
    mounts = ("500 400 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n")
    root = fake_host(tmp_path, "4:memory:/docker/abc\n", mounts)
    v1_group(root, "/", str(GIB), usage=GIB // 4)
    assert host_budget(root=root, environ={}) == Budget(3 * GIB // 4,
                                                         "cgroup v1 /sys/fs/cgroup/memory")


def test_the_usual_layout_without_mountinfo(tmp_path):
    root = fake_host(tmp_path, "0::/job\n", mounts=None)
    v2_group(root, "/job", str(GIB), usage=0)
    assert host_memory.cgroup_budgets(root) == [Budget(GIB, "cgroup v2 /sys/fs/cgroup/job")]


def test_a_tiny_limit_leaves_nothing(tmp_path):
    root = fake_host(tmp_path, "4:memory:/job\n", MOUNTS_V1)
    v1_group(root, "/job", str(100 * 2**20), usage=200 * 2**20)
    assert host_budget(root=root, environ={}).bytes == 0


def test_missing_files_fall_back_to_available_memory(tmp_path):
    root = fake_host(tmp_path, "4:memory:/gone\n0::/gone\n", MOUNTS_V1 + MOUNTS_V2)
    assert host_budget(root=root, environ={}) == Budget(20 * GIB, "MemAvailable")
    os.remove(os.path.join(root, "proc/self/cgroup"))
    assert host_memory.cgroup_budgets(root) == []
    os.remove(os.path.join(root, "proc/meminfo"))
    assert host_budget(root=root, environ={}).source == "physical memory"


def test_explicit_limit_and_processes_sharing_the_host(tmp_path):
    root = fake_host(tmp_path, "0::/\n", MOUNTS_V2, available_gib=20)
    assert host_budget("6G", root, {}) == Budget(6 * GIB, "--host-memory")
    assert host_budget("64G", root, {}) == Budget(20 * GIB, "MemAvailable")
    shared = host_budget("6G", root, {"SLURM_NTASKS_PER_NODE": "4(x2)"})
    assert shared == Budget(6 * GIB // 4, "--host-memory shared by 4 processes on the host")
    # --host-memory is the most the run may hold: what the process holds already is spent
    write(root, "proc/self/status", "Name: python\nVmRSS:\t 1048576 kB\n")
    assert host_budget("6G", root, {}) == Budget(5 * GIB, "--host-memory")
    assert host_budget("512M", root, {}).bytes == 0
    assert host_memory.processes_per_host({}) == 1


@pytest.mark.parametrize("environ,expected", [
    # torchrun-style launchers say it themselves, whatever SLURM says
    ({"LOCAL_WORLD_SIZE": "2", "SLURM_NTASKS_PER_NODE": "8"}, 2),
    # sbatch --nodes=2 --ntasks-per-node=4, then srun: every task of node 1
    ({"SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "8",
      "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_LOCALID": "3"}, 4),
    # sbatch --ntasks=4 on one node: no SLURM_NTASKS_PER_NODE
    ({"SLURM_TASKS_PER_NODE": "4", "SLURM_NTASKS": "4", "SLURM_NNODES": "1",
      "SLURM_NODEID": "0", "SLURM_LOCALID": "2"}, 4),
    # --ntasks=3 over 2 nodes: 2 tasks on node 0, 1 on node 1
    ({"SLURM_TASKS_PER_NODE": "2,1", "SLURM_NTASKS": "3", "SLURM_NNODES": "2",
      "SLURM_NODEID": "0", "SLURM_LOCALID": "1"}, 2),
    ({"SLURM_TASKS_PER_NODE": "2,1", "SLURM_NTASKS": "3", "SLURM_NNODES": "2",
      "SLURM_NODEID": "1", "SLURM_LOCALID": "0"}, 1),
    # the compressed form with a repeat count and a tail: nodes 0-2 run 2 tasks, node 3 one
    ({"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"}, 2),
    ({"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    # a step of one task per node inside an allocation of 4 per node: the step's layout
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_TASKS_PER_NODE": "4(x2)",
      "SLURM_NTASKS_PER_NODE": "4", "SLURM_NODEID": "1", "SLURM_LOCALID": "0"}, 1),
    # only the totals: 6 tasks on 4 nodes, at most 2 on any node
    ({"SLURM_NTASKS": "6", "SLURM_JOB_NUM_NODES": "4"}, 2),
    ({"SLURM_NTASKS": "6", "SLURM_NNODES": "3"}, 2),
    # this task's index on the node bounds the count from below
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_LOCALID": "3"}, 4),
    ({"SLURM_LOCALID": "1"}, 2),
    # nothing usable: one process
    ({"SLURM_TASKS_PER_NODE": "(null)", "SLURM_NODEID": "0"}, 1),
])
def test_processes_on_the_host_in_every_launch_mode(environ, expected):
    assert host_memory.processes_per_host(environ) == expected


@pytest.mark.parametrize("text,expected", [
    ("6G", 6 * GIB), ("6GiB", 6 * GIB), ("1.5g", 3 * GIB // 2), ("512M", 512 * 2**20),
    ("123456", 123456), ("2 TB", 2 * 2**40)])
def test_sizes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "6X", "0", "-1G", ""])
def test_bad_sizes_are_refused(text):
    with pytest.raises(UserError, match="--host-memory must be a size"):
        Config(host_memory=text)
