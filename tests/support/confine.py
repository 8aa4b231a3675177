"""Run a command under the kernel-enforced part of a systemd unit's hardening, without systemd.

    python -m tests.support.confine UNIT_FILE -- COMMAND [ARG...]

The test machines have no systemd as PID 1, so `systemd-run --scope -p ...` cannot apply
a unit's sandbox. This reads the unit's [Service] section and applies, then execs
COMMAND, what systemd 252 (Debian 12) itself builds for the options that are seccomp
filters or process attributes:

- SystemCallFilter= (the allow-list with its `~` removals, groups expanded by
  `systemd-analyze syscall-filter`, so the sets are exactly this systemd's), with
  SystemCallErrorNumber= as the action for everything else and SystemCallArchitectures=
  native (libseccomp's default: other ABIs are killed);
- MemoryDenyWriteExecute=: systemd 252's seccomp rules (no mmap both writable and
  executable, no mprotect/pkey_mprotect to executable, no shmat with SHM_EXEC), plus the
  kernel's own PR_SET_MDWE where the kernel has it (what newer systemd uses);
- RestrictAddressFamilies= (socket() of any other family fails with EAFNOSUPPORT),
  RestrictNamespaces=yes, RestrictRealtime=yes, RestrictSUIDSGID=yes, LockPersonality=yes;
- NoNewPrivileges=, CapabilityBoundingSet= (an empty one: every capability dropped from
  the bounding set, so even root keeps none across exec), UMask=.

The mount-namespace options (ProtectSystem=, PrivateTmp=, ...) and User= are not
applied: they need systemd's namespace set-up, and `systemd-analyze verify`/`security`
check them statically instead. Filters are built with libseccomp (libseccomp2, which the
systemd package depends on) through ctypes: the venv's Python is not Debian's, so
Debian's python3-seccomp bindings cannot be imported into it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# libseccomp actions and comparison operators (seccomp.h).
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_MASKED_EQ = 1, 4, 5, 7
SCMP_FLTATR_CTL_NNP = 3  # leave no_new_privs to us (set explicitly below)


def scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


# Linux constants the rules compare against.
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                   0x20000000, 0x40000000, 0x00000080)  # NS UTS IPC USER PID NET CGROUP TIME
SCHED_REALTIME = (1, 2, 6)  # FIFO, RR, DEADLINE
PER_LINUX = 0
S_ISUID, S_ISGID, O_CREAT = 0o4000, 0o2000, 0o100
# Where each call takes its mode (and, for the opens, its flags): (syscall, mode arg, flags arg).
MODE_ARGUMENTS = (("chmod", 1, None), ("fchmod", 1, None), ("fchmodat", 2, None),
                  ("mkdir", 1, None), ("mkdirat", 2, None), ("mknod", 1, None),
                  ("mknodat", 2, None), ("creat", 1, None), ("open", 2, 1), ("openat", 3, 2))
AF_MAX = 46
ADDRESS_FAMILIES = {"AF_UNIX": 1, "AF_LOCAL": 1, "AF_INET": 2, "AF_INET6": 10,
                    "AF_NETLINK": 16, "AF_PACKET": 17}
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_MDWE = 38, 24, 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


@dataclass
class Hardening:
    """The [Service] options this module applies, as the unit file sets them."""

    syscall_allow: list[str] = field(default_factory=list)
    syscall_deny: list[str] = field(default_factory=list)
    syscall_errno: str | None = None
    memory_deny_write_execute: bool = False
    address_families: list[str] | None = None
    restrict_namespaces: bool = False
    restrict_realtime: bool = False
    restrict_suid_sgid: bool = False
    lock_personality: bool = False
    no_new_privileges: bool = False
    capability_bounding_set: str | None = None
    umask: int | None = None


# The yes/no options, by their Hardening field.
BOOLEAN_OPTIONS = {
    "MemoryDenyWriteExecute": "memory_deny_write_execute",
    "RestrictNamespaces": "restrict_namespaces", "RestrictRealtime": "restrict_realtime",
    "RestrictSUIDSGID": "restrict_suid_sgid", "LockPersonality": "lock_personality",
    "NoNewPrivileges": "no_new_privileges",
}


def read_unit(path: Path) -> Hardening:
    hardening = Hardening()
    section = ""
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]" or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        yes = value.lower() in ("yes", "true", "1", "on")
        if key == "SystemCallFilter":
            if value.startswith("~"):
                hardening.syscall_deny += value[1:].split()
            else:
                hardening.syscall_allow += value.split()
        elif key == "SystemCallErrorNumber":
            hardening.syscall_errno = value
        elif key in BOOLEAN_OPTIONS:
            setattr(hardening, BOOLEAN_OPTIONS[key], yes)
        elif key == "RestrictAddressFamilies":
            hardening.address_families = value.split()
        elif key == "CapabilityBoundingSet":
            hardening.capability_bounding_set = value
        elif key == "UMask":
            hardening.umask = int(value, 8)
    return hardening


@functools.cache
def syscall_groups() -> dict[str, list[str]]:
    """systemd's own `@group` -> members table (members may be groups)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                         text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if re.match(r"^@[\w-]+$", line):
            current = groups.setdefault(line, [])
        elif current is not None and line.startswith(" ") and not line.strip().startswith("#"):
            if line.strip():
                current.append(line.strip())
    if "@system-service" not in groups:
        raise RuntimeError("systemd-analyze syscall-filter did not list @system-service")
    return groups


def expand(names: list[str]) -> set[str]:
    groups = syscall_groups()
    result: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name.startswith("@"):
            pending.extend(groups[name])
        else:
            result.add(name)
    return result


class Filter:
    """One seccomp filter built with libseccomp; filters stack, the strictest action wins
    (which is how systemd combines its own)."""

    def __init__(self, lib: ctypes.CDLL, default_action: int):
        self._lib = lib
        self.ctx = lib.seccomp_init(default_action)
        if not self.ctx:
            raise OSError("seccomp_init failed")
        self._check(lib.seccomp_attr_set(self.ctx, SCMP_FLTATR_CTL_NNP, 0), "attr_set")

    def _check(self, result: int, what: str) -> None:
        if result < 0:
            raise OSError(-result, f"seccomp_{what}: {os.strerror(-result)}")

    def rule(self, action: int, syscall: str, *conditions: tuple[int, int, int, int]) -> None:
        number = self._lib.seccomp_syscall_resolve_name(syscall.encode())
        if number == -1:  # __NR_SCMP_ERROR: not a syscall of this architecture
            return
        array = (ScmpArgCmp * max(1, len(conditions)))(*(ScmpArgCmp(*c) for c in conditions))
        self._check(self._lib.seccomp_rule_add_array(self.ctx, action, number,
                                                     len(conditions), array), "rule_add")

    def load(self) -> None:
        self._check(self._lib.seccomp_load(self.ctx), "load")
        self._lib.seccomp_release(self.ctx)


def _libseccomp() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ScmpArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def build_filters(hardening: Hardening) -> list[Filter]:
    """The filters in loading order: the allow-list goes last, since seccomp() itself is
    not in @system-service."""
    lib = _libseccomp()
    refuse = Filter(lib, SCMP_ACT_ALLOW)
    eperm = scmp_act_errno(errno.EPERM)
    if hardening.memory_deny_write_execute:
        both = PROT_WRITE | PROT_EXEC
        for name in ("mmap", "mmap2"):
            refuse.rule(eperm, name, (2, SCMP_CMP_MASKED_EQ, both, both))
        for name in ("mprotect", "pkey_mprotect"):
            refuse.rule(eperm, name, (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        refuse.rule(eperm, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
    if hardening.address_families is not None:
        allowed_families = {ADDRESS_FAMILIES[name] for name in hardening.address_families}
        for family in range(AF_MAX):
            if family not in allowed_families:
                refuse.rule(scmp_act_errno(errno.EAFNOSUPPORT), "socket",
                            (0, SCMP_CMP_EQ, family, 0))
        refuse.rule(scmp_act_errno(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_GE, AF_MAX, 0))
    if hardening.restrict_namespaces:
        refuse.rule(eperm, "setns")
        for flag in CLONE_NEW_FLAGS:
            refuse.rule(eperm, "unshare", (0, SCMP_CMP_MASKED_EQ, flag, flag))
            refuse.rule(eperm, "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        # clone3's flags are behind a pointer: like systemd, answer ENOSYS so that the C
        # library falls back to clone, whose flags the rules above see.
        refuse.rule(scmp_act_errno(errno.ENOSYS), "clone3")
    if hardening.restrict_realtime:
        for policy in SCHED_REALTIME:
            refuse.rule(eperm, "sched_setscheduler", (1, SCMP_CMP_EQ, policy, 0))
    if hardening.restrict_suid_sgid:
        for bit in (S_ISUID, S_ISGID):
            for name, mode_arg, flags_arg in MODE_ARGUMENTS:
                mode = (mode_arg, SCMP_CMP_MASKED_EQ, bit, bit)
                if flags_arg is None:
                    refuse.rule(eperm, name, mode)
                else:  # only a creating open takes a mode
                    refuse.rule(eperm, name, (flags_arg, SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT),
                                mode)
    if hardening.lock_personality:
        refuse.rule(eperm, "personality", (0, SCMP_CMP_NE, PER_LINUX, 0))
    filters = [refuse]
    if hardening.syscall_allow:
        number = getattr(errno, hardening.syscall_errno or "", None)
        fallback = scmp_act_errno(number) if number else SCMP_ACT_KILL_PROCESS
        allowed = Filter(lib, fallback)
        for name in sorted(expand(hardening.syscall_allow) - expand(hardening.syscall_deny)):
            allowed.rule(SCMP_ACT_ALLOW, name)
        filters.append(allowed)
    return filters


def _prctl(option: int, arg: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                        ctypes.c_ulong(0))
    return 0 if result == 0 else ctypes.get_errno()


def apply(hardening: Hardening) -> list[str]:
    """Confine this process (and what it execs); returns what was applied, for the log."""
    applied = []
    filters = build_filters(hardening)  # before any restriction: needs systemd-analyze
    if hardening.umask is not None:
        os.umask(hardening.umask)
        applied.append(f"UMask={hardening.umask:04o}")
    if hardening.capability_bounding_set == "":
        for capability in range(int(CAP_LAST_CAP.read_text()) + 1):
            if _prctl(PR_CAPBSET_DROP, capability) not in (0, errno.EINVAL):
                raise OSError(f"cannot drop capability {capability} from the bounding set")
        applied.append("CapabilityBoundingSet=")
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:  # required to load a filter unprivileged
        raise OSError("cannot set no_new_privs")
    applied.append("NoNewPrivileges=yes")
    if hardening.memory_deny_write_execute:
        mdwe = _prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)
        applied.append("MemoryDenyWriteExecute=yes (seccomp" +
                       (", PR_SET_MDWE)" if mdwe == 0 else ")"))
    for one in filters:
        one.load()
    applied.append(f"seccomp filters: {len(filters)}")
    return applied


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    applied = apply(read_unit(Path(argv[0])))
    print(f"confine: {'; '.join(applied)}", file=sys.stderr, flush=True)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
