"""The dependency cache on Nomad: the job spec (a host volume, read-write only in the
trusted installer) and the installer and run task code, run in the runner image as the
tasks run them (no Nomad; tiny wheels from a find-links directory, no package index)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pyexec.deps.cachedir import CacheDir
from pyexec.runner import nomad_job

from .conftest import TEST_IMAGE, make_settings
from .wheels import make_wheel


def tasks_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {task["Name"]: task for task in job["TaskGroups"][0]["Tasks"]}


def test_pip_jobs_mount_the_node_cache_read_write_only_in_the_installer() -> None:
    """With PYEXEC_NOMAD_DEPS_VOLUME the -pip jobs claim the host volume; the trusted
    installer mounts it read-write with the cache's rules beside its script, the run task
    (the request's image) read-only; no other task and no job without pip sees it."""
    settings = make_settings(nomad_deps_volume="pyexec-deps-host", deps_cache_bytes=10**9)
    jobs = {job["ID"]: job for job in nomad_job.runner_jobs(settings)}
    pip = jobs["pyexec-runner-small-pip"]
    assert pip["TaskGroups"][0]["Volumes"] == {
        "pyexec-deps": {
            "Name": "pyexec-deps",
            "Type": "host",
            "Source": "pyexec-deps-host",
            "ReadOnly": False,
        }
    }
    tasks = tasks_of(pip)
    mounts = {name: task.get("VolumeMounts") for name, task in tasks.items()}
    assert mounts == {
        "install": [{"Volume": "pyexec-deps", "Destination": "/pyexec-deps", "ReadOnly": False}],
        "run": [{"Volume": "pyexec-deps", "Destination": "/pyexec-deps", "ReadOnly": True}],
        "finish": None,
    }
    assert tasks["install"]["Config"]["image"] == settings.default_image  # the trusted image
    assert tasks["run"]["Config"]["image"] == "${NOMAD_META_image}"
    shipped = {t["DestPath"] for t in tasks["install"]["Templates"]}
    assert {"local/pyexec/cachedir.py", "local/pyexec/build_env.py"} <= shipped
    assert tasks["install"]["Env"]["PYEXEC_DEPS_DIR"] == "/pyexec-deps"
    assert "Volumes" not in jobs["pyexec-runner-small"]["TaskGroups"][0]


def test_without_the_volume_or_with_the_cache_off_no_job_changes() -> None:
    """Unset (the default) or PYEXEC_DEPS_CACHE_BYTES=0 (the tests' settings): the
    installer installs per run, as before."""
    plain = nomad_job.runner_jobs(make_settings())
    assert nomad_job.runner_jobs(make_settings(nomad_deps_volume="v")) == plain  # cache off
    assert all("Volumes" not in job["TaskGroups"][0] for job in plain)


# --- The installer and the run task, in the runner image -------------------------------------


def _docker(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["docker", "run", "--rm", *args], capture_output=True, timeout=180)


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A node's view: the shipped task files, a host volume, the operator's wheels."""
    for dest in nomad_job.TASK_FILES:
        target = tmp_path / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(nomad_job.task_file(dest))
    make_wheel(tmp_path / "wheels", "tinypkg", "1.0")
    make_wheel(tmp_path / "wheels", "tinypkg", "2.0")
    (tmp_path / "volume").mkdir()
    # The tasks run as uid 1000: the host volume's directory belongs to it (docs/deps-cache.md).
    os.chown(tmp_path / "volume", 1000, 1000)
    return tmp_path


def install(node: Path, alloc: str, requirements: str) -> dict[str, Any]:
    """One allocation's install task: the trusted image, the volume read-write."""
    (node / alloc / "data").mkdir(parents=True)
    os.chown(node / alloc / "data", 1000, 1000)  # Nomad's alloc dir is the tasks' to write
    record = {"status": "pending", "request": {"requirements_txt": requirements}}
    (node / "local" / "record.json").write_text(json.dumps(record))
    done = _docker(
        [
            "--network", "none", "--user", "1000:1000", "--read-only", "--tmpfs", "/tmp",
            "-v", f"{node / 'local'}:/local:ro",
            "-v", f"{node / alloc}:/alloc",
            "-v", f"{node / 'volume'}:/pyexec-deps",
            "-v", f"{node / 'wheels'}:/wheels:ro",
            "-e", "NOMAD_TASK_DIR=/local", "-e", "NOMAD_ALLOC_DIR=/alloc",
            "-e", "PYEXEC_DEPS_DIR=/pyexec-deps", "-e", "PYEXEC_DEPS_CACHE_BYTES=1000000000",
            "-e", "PYEXEC_DEPS_INDEX_URL=", "-e", "PIP_FIND_LINKS=/wheels",
            TEST_IMAGE, "python3", "-I", "/local/pyexec/nomad_install.py",
        ]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(
        (node / alloc / "data" / "pyexec" / "install.json").read_text()
    )
    return result


def run(node: Path, alloc: str, code: str) -> dict[str, Any]:
    """The same allocation's run task: the request's sandbox, the volume read-only."""
    (node / "local" / "record.json").write_text(
        json.dumps({"status": "pending", "request": {"entrypoint": "main.py"}})
    )
    (node / "src").mkdir(exist_ok=True)
    (node / "src" / "main.py").write_text(code)
    tar = node / "local" / "bundle.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", str(node / "src"), "main.py"], check=True)
    digest = hashlib.sha256(tar.read_bytes()).hexdigest()
    manifest = {"size": tar.stat().st_size, "sha256": digest}
    (node / "local" / "manifest.json").write_text(json.dumps(manifest))
    done = _docker(
        [
            "--network", "none", "--user", "1000:1000", "--read-only",
            "--tmpfs", "/work:exec,uid=1000", "--tmpfs", "/tmp",
            "-v", f"{node / 'local'}:/local:ro",
            "-v", f"{node / alloc}:/alloc",
            "-v", f"{node / 'volume'}:/pyexec-deps:ro",
            "-e", "NOMAD_TASK_DIR=/local", "-e", "NOMAD_ALLOC_DIR=/alloc",
            TEST_IMAGE, "python3", "-I", "-S", "/local/pyexec/nomad_run.py",
        ]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = node / alloc / "data" / "pyexec"
    verdict: dict[str, Any] = json.loads((out / "verdict.json").read_text())
    verdict["stdout"] = (out / "stdout").read_text()
    return verdict


WRITER = """\
import tinypkg
print(tinypkg.VERSION)
try:
    open(tinypkg.__file__, "a")
except OSError as exc:
    print(exc.errno)
"""


@pytest.mark.docker
def test_the_installer_builds_once_per_node_and_the_run_task_imports_read_only(
    node: Path,
) -> None:
    """The first allocation builds the environment into the volume (miss), the next one
    finds it (hit); the run task imports it from the read-only mount and cannot write it;
    another pin is another environment."""
    first = install(node, "alloc1", "tinypkg==1.0")
    assert (first["ok"], first["deps_cache"]) == (True, "miss")
    assert first["deps_site"].startswith("/pyexec-deps/envs/")
    verdict = run(node, "alloc1", WRITER)
    assert verdict["reason"] == "exited", verdict
    assert verdict["stdout"] == "1.0\n30\n"  # EROFS: the files are uid 1000's, the mount is not
    assert verdict["deps_cache"] == "miss"
    second = install(node, "alloc2", "TinyPkg==1.0")
    assert (second["deps_cache"], second["deps_site"]) == ("hit", first["deps_site"])
    third = install(node, "alloc3", "tinypkg==2.0")
    assert third["deps_cache"] == "miss"
    assert third["deps_site"] != first["deps_site"]
    assert len(CacheDir(str(node / "volume")).entries()) == 2


@pytest.mark.docker
def test_requirements_the_cache_does_not_take_are_installed_for_the_run_alone(
    node: Path,
) -> None:
    """A requirement with an environment marker goes the old way (into the allocation)."""
    result = install(node, "alloc1", "tinypkg==1.0; python_version >= '3'")
    assert result["ok"] is True, result
    assert "deps_cache" not in result
    assert (node / "alloc1" / "data" / "pyexec" / "site" / "tinypkg").is_dir()
    assert CacheDir(str(node / "volume")).entries() == []


@pytest.mark.docker
def test_a_missing_wheel_fails_the_install_and_leaves_nothing_in_the_cache(node: Path) -> None:
    """pip finding no wheel is the installer's failure, named; no environment appears."""
    result = install(node, "alloc1", "nosuchpkg==1.0")
    assert result["ok"] is False
    assert "nosuchpkg" in result["error"]
    assert CacheDir(str(node / "volume")).entries() == []


def test_the_prewarm_job_is_a_sysbatch_of_the_trusted_installer() -> None:
    """PYEXEC_DEPS_PREWARM with the node cache: a parameterized sysbatch job (one run per
    eligible node per dispatch) whose only task is the trusted installer, the volume
    read-write, told the sets; none without the volume or the sets."""
    settings = make_settings(
        nomad_deps_volume="pyexec-deps-host",
        deps_cache_bytes=10**9,
        deps_prewarm=(("numpy",), ("numpy", "pandas")),
    )
    job = nomad_job.deps_prewarm_job(settings)
    assert job is not None
    assert (job["ID"], job["Type"]) == ("pyexec-runner-deps-prewarm", "sysbatch")
    assert job["ParameterizedJob"] == {"Payload": "forbidden"}
    [group] = job["TaskGroups"]
    assert group["Volumes"]["pyexec-deps"]["Source"] == "pyexec-deps-host"
    [task] = group["Tasks"]
    assert task["Config"]["image"] == settings.default_image
    assert task["VolumeMounts"] == [
        {"Volume": "pyexec-deps", "Destination": "/pyexec-deps", "ReadOnly": False}
    ]
    assert json.loads(task["Env"]["PYEXEC_DEPS_PREWARM_SETS"]) == [["numpy"], ["numpy", "pandas"]]
    assert "Lifecycle" not in task
    assert nomad_job.deps_prewarm_job(make_settings(deps_prewarm=(("numpy",),))) is None
    no_sets = make_settings(nomad_deps_volume="v", deps_cache_bytes=10**9)
    assert nomad_job.deps_prewarm_job(no_sets) is None


@pytest.mark.docker
def test_the_prewarm_mode_builds_each_set_once_per_node(node: Path) -> None:
    """The installer in prewarm mode builds every set into the volume, and finds them
    there the next time (a second dispatch, or a node that has them)."""
    sets = json.dumps([["tinypkg==1.0"], ["tinypkg==2.0"]])
    argv = [
        "--network", "none", "--user", "1000:1000", "--read-only", "--tmpfs", "/tmp",
        "-v", f"{node / 'local'}:/local:ro",
        "-v", f"{node / 'volume'}:/pyexec-deps",
        "-v", f"{node / 'wheels'}:/wheels:ro",
        "-e", "PYEXEC_DEPS_DIR=/pyexec-deps", "-e", "PYEXEC_DEPS_CACHE_BYTES=1000000000",
        "-e", "PYEXEC_DEPS_INDEX_URL=", "-e", "PIP_FIND_LINKS=/wheels",
        "-e", f"PYEXEC_DEPS_PREWARM_SETS={sets}",
        TEST_IMAGE, "python3", "-I", "/local/pyexec/nomad_install.py",
    ]  # fmt: skip
    first = _docker(argv)
    assert first.returncode == 0, first.stderr
    assert b"tinypkg==1.0: miss" in first.stdout
    assert len(CacheDir(str(node / "volume")).entries()) == 2
    again = _docker(argv)
    assert again.returncode == 0, again.stderr
    assert b"tinypkg==1.0: hit" in again.stdout
    assert b"tinypkg==2.0: hit" in again.stdout
