"""What each host installs: homemx's own pure wheel plus its dependencies, pinned by
provision/requirements.lock and resolved for that host's own Python and platform.

The operator's machine builds only homemx's wheel (py3-none-any: the same on every host). For each
host it asks the host's ``python3`` for its version, implementation, architecture and glibc
(``probe``), walks homemx's dependency tree with the host's marker environment, pins every
package to the version in the lock file, and fetches the host's binary wheels with
``pip download --only-binary=:all: --platform … --python-version … --implementation cp --abi …``
into a cache on the operator's machine keyed by the host's tag
(``~/.cache/homemx/wheels/cp313-cp313-manylinux_2_36_aarch64``). The host then installs from the
uploaded files with ``pip install --no-index``: it needs no index access, and the same lock gives
the same files on every run (an unchanged set uploads and installs nothing).

Why not resolve on the host (``pip install`` there)? The host may have no route to the index, no
compiler and a different pip; here the operator sees every file before it travels. A dependency
with no wheel for a host's platform is an error naming the host, the package and the platform
(``WheelError``), not a source build on the host: homemx's hosts need no compiler.

Run ``python -m provision.wheels lock`` after changing the dependencies in pyproject.toml to write
the lock again.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

LOCK = Path(__file__).with_name("requirements.lock")
PROJECT = Path(__file__).resolve().parent.parent
# Reproducible wheels: without a fixed SOURCE_DATE_EPOCH every build stamps the current time into
# the zip entries, the hash changes, and every run would reinstall the venvs and restart everything.
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip entry can hold

# Printed by the host's python3 (stdlib only, any Python 3): its PEP 508 marker environment, its
# libc and whether it is a free-threaded build. Compatible with what packaging computes locally.
PROBE = r"""
import json, os, platform, sys, sysconfig
iv = sys.implementation.version
impl = "%d.%d.%d" % iv[:3] + ("" if iv.releaselevel == "final" else iv.releaselevel[0] + str(iv.serial))
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (ValueError, OSError, AttributeError):
    libc = ""
print(json.dumps({"env": {
    "implementation_name": sys.implementation.name, "implementation_version": impl,
    "os_name": os.name, "platform_machine": platform.machine(), "platform_release": platform.release(),
    "platform_system": platform.system(), "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform},
    "libc": libc, "platform": sysconfig.get_platform(),
    "gil_disabled": bool(sysconfig.get_config_var("Py_GIL_DISABLED"))}))
"""
PROBE_COMMAND = "python3 -c " + "'" + PROBE.replace("'", "'\\''") + "'"

# PEP 600 legacy aliases: manylinux2014 = glibc 2.17, manylinux2010 = 2.12, manylinux1 = 2.5
_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
_LEGACY_ARCHES = {17: {"x86_64", "i686", "aarch64", "armv7l", "ppc64", "ppc64le", "s390x"},
                  12: {"x86_64", "i686"}, 5: {"x86_64", "i686"}}


class WheelError(RuntimeError):
    """A one-line, user-facing reason why a host's wheels could not be had."""


def _at(host: str) -> str:
    """The message prefix naming the host (empty where the caller names it: provision.deploy)."""
    return f"{host}: " if host else ""


@dataclass(frozen=True)
class HostPython:
    """A host's python3 as far as wheel selection cares: version, ABI and platform tags, marker environment."""

    env: dict
    python_version: tuple[int, int]
    abi: str
    platforms: tuple[str, ...]  # most specific first

    @property
    def interpreter(self) -> str:
        return "cp%d%d" % self.python_version

    @property
    def tag(self) -> str:
        """Names the host's wheel set (and its cache directory), e.g. ``cp313-cp313-manylinux_2_36_aarch64``."""
        return f"{self.interpreter}-{self.abi}-{self.platforms[0]}"

    def tags(self) -> frozenset[Tag]:
        return frozenset([*cpython_tags(self.python_version, [self.abi], list(self.platforms)),
                          *compatible_tags(self.python_version, self.interpreter, list(self.platforms))])

    def pip_options(self) -> list[str]:
        opts = ["--only-binary=:all:", "--python-version", "%d.%d" % self.python_version,
                "--implementation", "cp", "--abi", self.abi]
        for p in self.platforms:
            opts += ["--platform", p]
        return opts


def host_python(facts: dict, host: str) -> HostPython:
    """The HostPython of what ``PROBE`` printed on ``host`` (a glibc Linux CPython; anything else is a WheelError)."""
    env = facts["env"]
    if env["implementation_name"] != "cpython":
        raise WheelError(f"{_at(host)}python3 is {env['platform_python_implementation']}, not CPython: unsupported")
    major, minor = (int(x) for x in env["python_version"].split("."))
    plat = facts["platform"]  # e.g. linux-x86_64, linux-aarch64
    m = re.fullmatch(r"glibc (\d+)\.(\d+)", facts.get("libc", ""))
    if not plat.startswith("linux-") or not m or m.group(1) != "2":
        raise WheelError(f"{_at(host)}platform {plat} with libc {facts.get('libc') or 'unknown'}: "
                         "only glibc Linux hosts are supported")
    arch = plat.split("-", 1)[1].replace("-", "_").replace(".", "_")
    glibc_minor = int(m.group(2))
    lowest = 5 if arch in ("x86_64", "i686") else 17
    platforms = []
    for minor_ in range(glibc_minor, lowest - 1, -1):
        platforms.append(f"manylinux_2_{minor_}_{arch}")
        if arch in _LEGACY_ARCHES.get(minor_, ()):
            platforms.append(f"{_LEGACY[minor_]}_{arch}")
    abi = "cp%d%d" % (major, minor) + ("t" if facts.get("gil_disabled") else "")
    return HostPython(env=dict(env), python_version=(major, minor), abi=abi, platforms=tuple(platforms))


def probe(run, host: str) -> HostPython:
    """Ask the host (``run(cmd) -> stdout``) for its python3 and make its HostPython."""
    out = run(PROBE_COMMAND)
    try:
        facts = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise WheelError(f"{_at(host)}python3 did not answer the platform probe (is python3 installed?)") from None
    return host_python(facts, host)


# ---------------------------------------------------------------- the lock file

def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``name==version`` lines (comments and blank lines ignored) → {canonical name: version}."""
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        if not m:
            raise WheelError(f"{path}:{n}: not a `name==version` line: {line}")
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def write_lock(project: Path = PROJECT, out: Path = LOCK) -> dict[str, str]:
    """Resolve homemx's dependencies with pip (the newest versions pyproject.toml allows) for this
    Python and write the lock. A package that only another host's Python or platform needs (by a
    marker) and that is missing here makes that host's resolve fail with its name: add it by hand."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                        "--report", "-", str(project)], capture_output=True, text=True)
    if r.returncode != 0:
        raise WheelError(f"pip could not resolve homemx's dependencies: {r.stderr.strip().splitlines()[-1:]}")
    pins = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
            for i in json.loads(r.stdout)["install"]}
    pins.pop("homemx", None)
    out.write_text("# homemx's runtime dependencies, pinned: what every host installs (provision/wheels.py).\n"
                   "# Written by `python -m provision.wheels lock` from pyproject.toml; edit pyproject, not this.\n"
                   + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    return pins


# ---------------------------------------------------------------- resolving for one host

def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def requirements(wheel: Path, env: dict, extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """The wheel's Requires-Dist that apply to ``env`` (a host's marker environment) with ``extras``."""
    out = []
    for line in _metadata(wheel).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def _wheel_key(path: Path) -> tuple[str, Version, frozenset[Tag]]:
    name, version, _, tags = parse_wheel_filename(path.name)
    return canonicalize_name(name), version, frozenset(tags)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "homemx" / "wheels"


@dataclass
class HostWheels:
    """homemx's wheel, and for each host the dependency wheels for that host's Python and platform."""

    homemx: Path
    lock: Path = LOCK
    cache: Path = field(default_factory=default_cache)
    sources: tuple[Path, ...] = ()  # directories searched before downloading (e.g. --wheelhouse DIR)
    pip: tuple[str, ...] = (sys.executable, "-m", "pip")
    resolved: dict[str, list[Path]] = field(default_factory=dict)  # by host tag: each tag resolved once a run

    def for_host(self, run, host: str) -> tuple[HostPython, list[Path]]:
        """Probe the host through ``run`` and return its HostPython and the wheels it installs (homemx's first)."""
        py = probe(run, host)
        if py.tag not in self.resolved:
            self.resolved[py.tag] = [self.homemx, *self.resolve(py, host)]
        return py, self.resolved[py.tag]

    def _find(self, name: str, version: str, tags: frozenset[Tag], dirs) -> Path | None:
        for d in dirs:
            for w in sorted(Path(d).glob("*.whl")):
                n, v, wt = _wheel_key(w)
                if n == name and v == Version(version) and wt & tags:
                    return w
        return None

    def resolve(self, py: HostPython, host: str) -> list[Path]:
        """Every dependency of homemx for ``py``, pinned by the lock: found in ``sources`` or the tag's
        cache, else downloaded into the cache. One pip call per level of the dependency tree."""
        pins = read_lock(self.lock)
        tags = py.tags()
        cache = self.cache / py.tag
        dirs = [*self.sources, cache, self.cache / "pure"]
        chosen: dict[str, Path] = {}
        seen_extras: dict[str, frozenset[str]] = {}
        todo = [(req, "homemx") for req in requirements(self.homemx, py.env)]
        while todo:
            wanted: dict[str, frozenset[str]] = {}
            for req, parent in todo:
                name = canonicalize_name(req.name)
                if name not in pins:
                    raise WheelError(f"{_at(host)}{name} (needed by {parent}) is not pinned in {self.lock}: "
                                     "write it again with `python -m provision.wheels lock`")
                if not req.specifier.contains(pins[name], prereleases=True):
                    raise WheelError(f"{_at(host)}{self.lock} pins {name}=={pins[name]} but {parent} needs "
                                     f"{name}{req.specifier}: write it again with `python -m provision.wheels lock`")
                extras = seen_extras.get(name, frozenset()) | frozenset(req.extras)
                if name not in chosen or extras != seen_extras.get(name):
                    wanted[name] = extras
            found = {n: self._find(n, pins[n], tags, dirs) for n in wanted}
            missing = sorted(n for n, w in found.items() if w is None)
            if missing:
                self._download(py, host, [f"{n}=={pins[n]}" for n in missing], cache)
                for n in missing:
                    found[n] = self._find(n, pins[n], tags, dirs)
                    if found[n] is None:
                        raise WheelError(f"{_at(host)}no wheel of {n}=={pins[n]} for {py.interpreter} on "
                                         f"{py.platforms[0]}")
            todo = []
            for n, extras in sorted(wanted.items()):
                chosen[n], seen_extras[n] = found[n], extras
                todo += [(req, n) for req in requirements(found[n], py.env, extras)]
        return sorted(chosen.values(), key=lambda w: w.name.lower())

    def _download(self, py: HostPython, host: str, pins: list[str], dest: Path) -> None:
        """``pip download`` the host's binary wheels of ``pins`` into ``dest``. A release published
        only as an sdist (dkimpy) is built here into a wheel once, kept only if pure Python
        (``*-none-any``: the same for every host); anything else is a one-line WheelError."""
        dest.mkdir(parents=True, exist_ok=True)
        pins = list(pins)
        while pins:
            cmd = [*self.pip, "download", "-q", "--no-deps", "--dest", str(dest), *py.pip_options(), *pins]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                return
            m = re.search(r"(?:satisfies the requirement|distribution found for) ([A-Za-z0-9._-]+)==(\S+)", r.stderr)
            if not m:
                last = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-1]
                raise WheelError(f"{_at(host)}pip download of {py.tag} wheels failed: {last}")
            pin = f"{m.group(1)}=={m.group(2)}"
            if not self._build_pure(pin):
                raise WheelError(f"{_at(host)}no wheel of {pin} for {py.interpreter} on {py.platforms[0]} "
                                 "(and its source does not build a pure-Python wheel; hosts get no compiler)")
            pins = [p for p in pins if canonicalize_name(p.split("==")[0]) != canonicalize_name(m.group(1))]

    def _build_pure(self, pin: str) -> bool:
        """Build ``pin`` from its sdist on this machine; keep it in <cache>/pure when it is pure Python."""
        pure = self.cache / "pure"
        pure.mkdir(parents=True, exist_ok=True)
        tmp = pure / ".build"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            r = subprocess.run([*self.pip, "wheel", "-q", "--no-deps", "--no-binary", pin.split("==")[0],
                                "-w", str(tmp), pin], capture_output=True, text=True,
                               env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
            built = sorted(tmp.glob("*.whl")) if r.returncode == 0 else []
            if len(built) != 1 or not built[0].name.endswith("-none-any.whl"):
                return False
            built[0].replace(pure / built[0].name)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def project_dir(start: Path = PROJECT) -> Path:
    """homemx's source tree: the checkout this module runs from (an editable install), else the
    current directory when it is one; a WheelError otherwise."""
    for d in (start, Path.cwd()):
        py = d / "pyproject.toml"
        if py.is_file() and re.search(r'(?m)^name = "homemx"$', py.read_text()):
            return d
    raise WheelError("no homemx checkout here: run from the checkout, install with `pip install -e`, "
                     "or pass --wheelhouse DIR")


# not sources of the wheel: left out of the clean copy it is built from
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                      ".pytest_cache", "tests", "demo", "var", "bench-results", "site.toml")


def build_homemx_wheel(project: Path, out: Path) -> Path:
    """homemx's own wheel (pure Python: every host installs the same file), reproducibly built into
    ``out``; older homemx wheels there are removed.

    Built from a copy of the sources in a temporary directory (removed afterwards): setuptools
    reuses ``<project>/build/lib`` files that look newer than the sources, so a leftover from an
    earlier build would be deployed instead of the checkout's code."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("homemx-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="homemx-build-") as tmp:
        src = Path(tmp) / "homemx"
        shutil.copytree(project, src, ignore=_NOT_SOURCES)
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                           capture_output=True, text=True, env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    built = sorted(out.glob("homemx-*-py3-none-any.whl"))
    if r.returncode != 0 or len(built) != 1:
        last = (r.stderr.strip() or "no py3-none-any wheel").splitlines()[-1]
        raise WheelError(f"building homemx's wheel from {project} failed: {last}")
    return built[0]


def operator_wheels(wheelhouse: str = "", cache: Path | None = None) -> HostWheels:
    """What the fab tasks deploy: homemx's wheel built from the checkout into the cache (nothing is
    left in the temporary directory), or the one in ``wheelhouse``, whose other wheels are then
    used for the hosts whose Python and platform they fit before anything is downloaded."""
    cache = cache or default_cache()
    if wheelhouse:
        found = sorted(Path(wheelhouse).glob("homemx-*.whl"))
        if not found:
            raise WheelError(f"no homemx wheel in {wheelhouse}")
        return HostWheels(homemx=found[-1], cache=cache, sources=(Path(wheelhouse),))
    return HostWheels(homemx=build_homemx_wheel(project_dir(), cache / "homemx"), cache=cache)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["lock"]:
        print("usage: python -m provision.wheels lock   (writes provision/requirements.lock)", file=sys.stderr)
        return 2
    try:
        pins = write_lock()
    except WheelError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{LOCK}: {len(pins)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
