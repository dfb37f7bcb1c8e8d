"""What a host installs is resolved for that host's Python and platform, not the operator's
(provision/wheels.py); the operator's machine keeps no wheel directory in the temporary directory.

The namespace host that installs from what was resolved for it is in test_fabric_deploy.py
(test_first_run_files_keys_and_permissions: its home host runs another Python than the operator).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from provision import wheels

REPO = Path(__file__).resolve().parents[2]

# what a Raspberry Pi 4/5 with Debian 13 (CPython 3.13, glibc 2.41) prints for wheels.PROBE
PI_FACTS = {"env": {"implementation_name": "cpython", "implementation_version": "3.13.5", "os_name": "posix",
                    "platform_machine": "aarch64", "platform_release": "6.12.47+rpt-rpi-v8",
                    "platform_system": "Linux", "platform_version": "#1 SMP PREEMPT Debian 1:6.12.47-1+rpt1",
                    "python_full_version": "3.13.5", "platform_python_implementation": "CPython",
                    "python_version": "3.13", "sys_platform": "linux"},
            "libc": "glibc 2.41", "platform": "linux-aarch64", "gil_disabled": False}


@pytest.fixture(scope="module")
def homemx_wheel(tmp_path_factory):
    return wheels.build_homemx_wheel(REPO, tmp_path_factory.mktemp("homemx"))


def test_probe_reads_the_python_it_runs_on():
    """The probe command, run by a shell as it is on a host, gives that interpreter's own tags."""
    out = subprocess.run(["sh", "-c", wheels.PROBE_COMMAND.replace("python3 -c", f"{sys.executable} -c", 1)],
                         capture_output=True, text=True, check=True).stdout
    py = wheels.probe(lambda cmd: out, "here")
    assert py.python_version == sys.version_info[:2] and py.abi == "cp%d%d" % sys.version_info[:2]
    assert py.tags() >= {t for t in sys_tags() if "manylinux" in t.platform or t.platform == "any"}
    assert py.tag == f"{py.interpreter}-{py.abi}-{py.platforms[0]}" and py.platforms[0].endswith(os.uname().machine)


@pytest.mark.slow
def test_resolves_every_dependency_for_linux_aarch64_cpython_313(homemx_wheel, tmp_path):
    """Reaches the package index (like apt-get): every locked dependency homemx needs on a Pi with
    CPython 3.13 has a wheel for it, and only such wheels are chosen."""
    py = wheels.host_python(PI_FACTS, "pi")
    assert py.tag == "cp313-cp313-manylinux_2_41_aarch64"
    got = wheels.HostWheels(homemx=homemx_wheel, cache=tmp_path).resolve(py, "pi")
    names = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in got}
    # everything homemx asks for (no markers exclude any of them on 3.13), and their own dependencies
    direct = {canonicalize_name(r.name) for r in wheels.requirements(homemx_wheel, py.env)}
    assert direct <= names and {"pydantic-core", "cffi", "multidict", "idna"} <= names
    assert names <= set(wheels.read_lock())
    for w in got:
        tags = parse_wheel_filename(w.name)[3]
        assert tags & py.tags(), w.name
        assert all(t.platform == "any" or t.platform.endswith("_aarch64") for t in tags), w.name
        assert all(t.interpreter in ("cp313", "py3", "py2") or t.abi == "abi3" for t in tags), w.name
        assert w.parent in (tmp_path / py.tag, tmp_path / "pure")  # the host's cache, never the temp dir
    binary = [w.name for w in got if not w.name.endswith("-none-any.whl")]
    assert any(n.startswith("pydantic_core-") and "-cp313-cp313-" in n for n in binary), binary


def test_a_dependency_with_no_wheel_for_the_host_is_one_line(homemx_wheel, tmp_path, monkeypatch):
    """No index reachable here (an empty local one): the error names the host, the package and the
    host's platform, on one line."""
    empty = tmp_path / "index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    py = wheels.host_python({**PI_FACTS, "platform": "linux-riscv64",
                             "env": {**PI_FACTS["env"], "platform_machine": "riscv64"}}, "pi (root@pi.lan)")
    with pytest.raises(wheels.WheelError) as e:
        wheels.HostWheels(homemx=homemx_wheel, cache=tmp_path / "cache").resolve(py, "pi (root@pi.lan)")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("pi (root@pi.lan): no wheel of ") and " for cp313 on manylinux_2_41_riscv64 " in msg, msg
    name = msg.split("no wheel of ", 1)[1].split("==", 1)[0]
    assert canonicalize_name(name) in wheels.read_lock()


def test_unsupported_hosts_are_one_line_errors():
    with pytest.raises(wheels.WheelError, match=r"^vps: platform linux-x86_64 with libc unknown: only glibc"):
        wheels.host_python({**PI_FACTS, "platform": "linux-x86_64", "libc": ""}, "vps")
    with pytest.raises(wheels.WheelError, match=r"^vps: python3 did not answer the platform probe"):
        wheels.probe(lambda cmd: "", "vps")


def test_the_lock_pins_what_pyproject_asks_for():
    """The lock covers every dependency in pyproject.toml within its range (else: `python -m provision.wheels lock`)."""
    import tomllib

    from packaging.requirements import Requirement

    pins = wheels.read_lock()
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        assert canonicalize_name(req.name) in pins, req.name
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), (req, pins[req.name])


def test_preparing_a_deploy_leaves_no_wheel_directory_in_the_temp_dir(tmp_path, monkeypatch):
    """The fab tasks' preparation (homemx's wheel) writes to the cache, and nothing stays in $TMPDIR."""
    from provision import fabfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    site = tmp_path / "site.toml"
    site.write_text((REPO / "provision" / "site.example.toml").read_text())
    _, hw, _ = fabfile._prepare(str(site))
    assert sorted(os.listdir(tmp)) == []
    assert hw.homemx.parent == tmp_path / "cache" / "homemx" / "wheels" / "homemx"
    assert hw.homemx.name.endswith("-py3-none-any.whl")


def test_a_stale_build_directory_in_the_checkout_does_not_reach_the_wheel(tmp_path):
    """setuptools reuses <checkout>/build/lib when its files look newer than the sources: a file left
    there by an earlier build (another branch, an archive's mtimes) would be deployed instead of the
    checkout's. homemx's wheel is built from a clean copy of the sources."""
    import zipfile

    checkout = tmp_path / "homemx"
    files = subprocess.run(["git", "ls-files", "-z", "pyproject.toml", "README.md", "LICENSE*", "backend", "gateway",
                            "wireguard", "provision"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
            (checkout / rel).write_bytes((REPO / rel).read_bytes())
    stale = checkout / "build" / "lib" / "provision" / "hostside.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("raise SystemExit('an old hostside')\n")
    future = (checkout / "provision" / "hostside.py").stat().st_mtime + 3600
    os.utime(stale, (future, future))
    wheel = wheels.build_homemx_wheel(checkout, tmp_path / "out")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("provision/hostside.py") == (checkout / "provision" / "hostside.py").read_bytes()
    assert sorted(os.listdir(tmp_path / "out")) == [wheel.name]


def test_deploy_names_the_host_when_its_wheels_cannot_be_had(homemx_wheel, tmp_path, monkeypatch):
    """Through deploy.ensure_venv (the host here is the operator's own shell, through invoke: the
    same run() Fabric's connections have): the one line names the role, the SSH target, the step,
    the package and the host's platform, and nothing is written on the host."""
    from invoke import Context

    from provision import deploy
    from provision.site import HostLayout

    empty = tmp_path / "index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    here = wheels.probe(lambda cmd: subprocess.run(["sh", "-c", cmd], capture_output=True, text=True).stdout, "")
    r = deploy.Remote(Context(), HostLayout(ssh="root@pi.lan", root=str(tmp_path / "root")), "backend", deploy.Report())
    with pytest.raises(deploy.ProvisionError) as e:
        deploy.ensure_venv(r, wheels.HostWheels(homemx=homemx_wheel, cache=tmp_path / "cache"))
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith("backend (root@pi.lan): wheels for this host's python3: no wheel of "), text
    assert f" for {here.interpreter} on {here.platforms[0]} " in text
    assert not (tmp_path / "root").exists() and r.uploads == []
