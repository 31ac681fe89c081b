"""The runner job spec: golden file, agreement with jobs/*.hcl, resource classes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import hcl2
import pytest

from pyexec.errors import LimitExceeded
from pyexec.models import ExecutionConfig
from pyexec.runner import nomad_job
from pyexec.settings import ResourceClass, Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "nomad-runner-jobs.json"
HCL = ROOT / "jobs" / "pyexec-runner.nomad.hcl"
SCRIPT_PATH = "pyexec/taskscripts/pyexec_task.py"
SCRIPT_PLACEHOLDER = f"<contents of {SCRIPT_PATH}>"
NS = 1_000_000_000
DURATION = re.compile(r"^(\d+)(s|m|h)$")


def golden_settings() -> Settings:
    return Settings(
        nomad_addr="http://nomad.example:4646",
        consul_addr="consul.service:8500",
        nomad_consul_addr="http://10.0.0.5:8500",
        nomad_datacenters=("dc1", "dc2"),
        nomad_node_pool="pyexec",
        nomad_namespace="sandbox",
        nomad_constraints=("${attr.kernel.name} = linux", "${node.class} != gpu"),
    )


def without_script(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs with the task script replaced by a placeholder (it is checked on its own)."""
    script = nomad_job.task_script()
    copied = json.loads(json.dumps(jobs))
    for job in copied:
        for task in job["TaskGroups"][0]["Tasks"]:
            for template in task["Templates"]:
                if template["EmbeddedTmpl"] == script:
                    template["EmbeddedTmpl"] = SCRIPT_PLACEHOLDER
    return copied


def test_golden() -> None:
    """The rendered runner jobs equal the golden file (PYEXEC_UPDATE_GOLDEN=1 rewrites it)."""
    rendered = without_script(nomad_job.runner_jobs(golden_settings()))
    if os.environ.get("PYEXEC_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(rendered, indent=2, sort_keys=True) + "\n")
    assert rendered == json.loads(GOLDEN.read_text())


def test_every_task_ships_the_script_verbatim() -> None:
    """Each task's template holds the task script, untouched by template delimiters."""
    script = nomad_job.task_script()
    assert nomad_job.LEFT_DELIM not in script
    assert nomad_job.RIGHT_DELIM not in script
    job = nomad_job.runner_job(Settings(), Settings().nomad_resource_classes[0])
    for task in job["TaskGroups"][0]["Tasks"]:
        (template,) = [t for t in task["Templates"] if t["DestPath"] == nomad_job.SCRIPT_DEST]
        assert template["EmbeddedTmpl"] == script
        assert (template["LeftDelim"], template["RightDelim"]) == ("[[[pyexec", "pyexec]]]")


def test_one_job_per_class() -> None:
    """Each resource class gets its own job with the class's resources and tmpfs size."""
    settings = Settings(
        nomad_resource_classes=(
            ResourceClass("tiny", 100, 128, 64),
            ResourceClass("big", 4000, 16384, 8192),
        )
    )
    jobs = {job["ID"]: job for job in nomad_job.runner_jobs(settings)}
    assert set(jobs) == {"pyexec-runner-tiny", "pyexec-runner-big"}
    run = _task(jobs["pyexec-runner-big"], "run")
    assert run["Resources"] == {"CPU": 4000, "MemoryMB": 16384}
    assert run["Config"]["mount"][0] == {
        "type": "tmpfs",
        "target": "/work",
        "readonly": False,
        "tmpfs_options": {"size": 8192 * 1024 * 1024},
    }


def test_sandbox_matches_the_local_runner() -> None:
    """The run task has no network, a read-only root, no capabilities, uid 1000, pids cap."""
    run = _task(nomad_job.runner_job(Settings(), Settings().nomad_resource_classes[0]), "run")
    config = run["Config"]
    assert run["User"] == "1000"
    assert config["network_mode"] == "none"
    assert config["readonly_rootfs"] is True
    assert config["cap_drop"] == ["all"]
    assert config["pids_limit"] == Settings().default_pids_limit
    assert config["image"] == "${NOMAD_META_image}"
    assert "Lifecycle" not in run
    assert run["Env"] == {}  # the sandbox learns nothing about Consul


def test_code_never_runs_twice() -> None:
    """No restart and no reschedule: a failed run is reported, never repeated."""
    group = nomad_job.runner_job(Settings(), Settings().nomad_resource_classes[0])["TaskGroups"][0]
    assert group["RestartPolicy"]["Attempts"] == 0
    assert group["RestartPolicy"]["Mode"] == "fail"
    assert group["ReschedulePolicy"] == {"Attempts": 0, "Unlimited": False}


def test_ca_bundle_reaches_setup_only(tmp_path: Path) -> None:
    """PYEXEC_CA_BUNDLE is shipped to the setup task as a template, with pip's variables."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    job = nomad_job.runner_job(
        Settings(ca_bundle=str(bundle)), Settings().nomad_resource_classes[0]
    )
    setup = _task(job, "setup")
    (ca,) = [t for t in setup["Templates"] if t["DestPath"] == "local/ca-bundle.crt"]
    assert ca["EmbeddedTmpl"] == bundle.read_text()
    assert setup["Env"]["PIP_CERT"] == setup["Env"]["SSL_CERT_FILE"] == "/local/ca-bundle.crt"
    assert len(_task(job, "run")["Templates"]) == 1


def test_missing_ca_bundle_is_a_settings_error(tmp_path: Path) -> None:
    """A CA bundle path that cannot be read is refused, not silently skipped."""
    with pytest.raises(SettingsError, match="PYEXEC_CA_BUNDLE"):
        nomad_job.runner_jobs(Settings(ca_bundle=str(tmp_path / "missing.pem")))


def test_bad_constraint_is_a_settings_error() -> None:
    """A constraint that is not `attribute operator value` is refused with the setting name."""
    with pytest.raises(SettingsError, match="PYEXEC_NOMAD_CONSTRAINTS"):
        nomad_job.runner_jobs(Settings(nomad_constraints=("${attr.kernel.name} linux",)))


def _config(memory_mb: int, disk_mb: int = 64, pids_limit: int = 256) -> ExecutionConfig:
    return ExecutionConfig(
        timeout_seconds=10,
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        cpu_shares=1024,
        pids_limit=pids_limit,
        max_output_bytes=1024,
    )


@pytest.mark.parametrize(
    ("memory_mb", "disk_mb", "expected"),
    [
        (128, 64, "small"),
        (512, 1024, "small"),
        (513, 64, "medium"),
        (600, 4096, "medium"),
        (100, 4097, "large"),
        (8192, 64, "large"),
    ],
)
def test_smallest_class_that_fits(memory_mb: int, disk_mb: int, expected: str) -> None:
    """A request maps to the smallest resource class with enough memory and disk."""
    assert nomad_job.pick_class(Settings(), _config(memory_mb, disk_mb)).name == expected


def test_no_class_fits() -> None:
    """A request larger than every class is refused with code no_resource_class."""
    with pytest.raises(LimitExceeded) as caught:
        nomad_job.pick_class(Settings(), _config(9000))
    assert caught.value.code == "no_resource_class"
    assert "large (8192 MiB memory" in caught.value.message


def test_pids_above_the_job_limit_is_refused() -> None:
    """pids_limit above what the runner jobs enforce is refused, not silently lowered."""
    with pytest.raises(LimitExceeded) as caught:
        nomad_job.pick_class(Settings(), _config(128, pids_limit=1000))
    assert caught.value.code == "no_resource_class"


# --- the HCL file and the function agree ------------------------------------------------------


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return json.loads(value)
    return value


def _plain(value: Any) -> Any:
    """python-hcl2's output without block markers and with string literals unquoted."""
    if isinstance(value, dict):
        return {_unquote(k): _plain(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return _unquote(value)


def _labelled(blocks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: body for block in blocks for name, body in block.items()}


def _one(blocks: list[dict[str, Any]] | None) -> dict[str, Any]:
    return (blocks or [{}])[0]


def _ns(text: str) -> int:
    match = DURATION.match(text)
    assert match, text
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)] * NS


def _file_ref(data: str) -> str:
    match = re.fullmatch(r'\$\{file\("([^"]+)"\)\}', data)
    assert match, data
    return match.group(1)


def _hcl_task(name: str, body: dict[str, Any]) -> dict[str, Any]:
    config = dict(_one(body.get("config")))
    for mount in config.get("mount", []):
        mount["tmpfs_options"] = _one(mount.get("tmpfs_options"))
    resources = _one(body.get("resources"))
    task: dict[str, Any] = {
        "Name": name,
        "Driver": body["driver"],
        "User": body["user"],
        "Config": config,
        "Env": _one(body.get("env")),
        "Templates": [
            {
                "EmbeddedTmpl": _file_ref(t["data"]),
                "DestPath": t["destination"],
                "ChangeMode": t["change_mode"],
                "Perms": t["perms"],
                "LeftDelim": t["left_delimiter"],
                "RightDelim": t["right_delimiter"],
            }
            for t in body.get("template", [])
        ],
        "Resources": {"CPU": resources["cpu"], "MemoryMB": resources["memory"]},
        "KillTimeout": _ns(body["kill_timeout"]),
    }
    if "lifecycle" in body:
        lifecycle = _one(body["lifecycle"])
        task["Lifecycle"] = {"Hook": lifecycle["hook"], "Sidecar": lifecycle["sidecar"]}
    return task


def hcl_as_api_json(path: Path) -> dict[str, Any]:
    """The HCL job in Nomad's API JSON form, for the fields pyexec sets."""
    with path.open() as fh:
        parsed = _plain(hcl2.load(fh))
    ((job_id, job),) = _labelled(parsed["job"]).items()
    ((group_name, group),) = _labelled(job["group"]).items()
    parameterized = _one(job["parameterized"])
    restart, reschedule = _one(group["restart"]), _one(group["reschedule"])
    return {
        "ID": job_id,
        "Name": job_id,
        "Type": job["type"],
        "Datacenters": job["datacenters"],
        "ParameterizedJob": {
            "Payload": parameterized["payload"],
            "MetaRequired": parameterized["meta_required"],
            "MetaOptional": parameterized["meta_optional"],
        },
        "Meta": _one(job.get("meta")),
        "Constraints": [],
        "TaskGroups": [
            {
                "Name": group_name,
                "Count": group["count"],
                "RestartPolicy": {
                    "Attempts": restart["attempts"],
                    "Interval": _ns(restart["interval"]),
                    "Delay": _ns(restart["delay"]),
                    "Mode": restart["mode"],
                },
                "ReschedulePolicy": {
                    "Attempts": reschedule["attempts"],
                    "Unlimited": reschedule["unlimited"],
                },
                "EphemeralDisk": {"SizeMB": _one(group["ephemeral_disk"])["size"]},
                "Tasks": [_hcl_task(n, b) for n, b in _labelled(group["task"]).items()],
            }
        ],
    }


def test_hcl_file_agrees_with_the_function() -> None:
    """jobs/pyexec-runner.nomad.hcl is the function's small-class job, field for field."""
    settings = Settings()
    expected = nomad_job.runner_job(settings, settings.nomad_resource_classes[0])
    for task in expected["TaskGroups"][0]["Tasks"]:
        for template in task["Templates"]:
            assert template["EmbeddedTmpl"] == nomad_job.task_script()
            template["EmbeddedTmpl"] = SCRIPT_PATH
    assert hcl_as_api_json(HCL) == expected


def test_hcl_template_reads_the_packaged_script() -> None:
    """The file() the HCL templates read is the script the function embeds."""
    assert (ROOT / SCRIPT_PATH).read_text() == nomad_job.task_script()


def _task(job: dict[str, Any], name: str) -> dict[str, Any]:
    (task,) = [t for t in job["TaskGroups"][0]["Tasks"] if t["Name"] == name]
    return task


def test_task_script_runs_on_python_3_10(tmp_path: Path) -> None:
    """The task script imports on Python 3.10 (no 3.11-only names such as datetime.UTC)."""
    import subprocess
    import sys

    script = ROOT / SCRIPT_PATH
    probe = (
        "import datetime, runpy, sys\n"
        "del datetime.UTC  # as on Python 3.10\n"
        f"runpy.run_path({str(script)!r}, run_name='probe')\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


@pytest.mark.parametrize(
    ("task_consul", "mode"),
    [
        ("http://10.0.0.5:8500", "bridge"),
        ("http://${attr.unique.network.ip-address}:8500", "bridge"),
        ("https://consul.service.consul:8501", "bridge"),
        ("http://127.0.0.1:8500", "host"),
        ("localhost:8500", "host"),
        ("http://[::1]:8500", "host"),
    ],
)
def test_setup_and_finish_use_bridge_unless_consul_is_on_loopback(
    task_consul: str, mode: str
) -> None:
    """Setup and finish get their own network namespace unless Consul is only on loopback."""
    settings = Settings(nomad_consul_addr=task_consul)
    job = nomad_job.runner_job(settings, settings.nomad_resource_classes[0])
    assert _task(job, "setup")["Config"]["network_mode"] == mode
    assert _task(job, "finish")["Config"]["network_mode"] == mode
    assert _task(job, "run")["Config"]["network_mode"] == "none"
