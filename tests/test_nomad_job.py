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
        setup_network=True,  # every variant, the setup task's included
    )


def without_script(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs with each shipped module replaced by a placeholder naming it (the modules
    are checked on their own)."""
    copied = json.loads(json.dumps(jobs))
    for job in copied:
        for task in job["TaskGroups"][0]["Tasks"]:
            for template in task["Templates"]:
                source = nomad_job.TASK_FILES.get(template["DestPath"])
                if source is not None:
                    assert template["EmbeddedTmpl"] == nomad_job.task_file(template["DestPath"])
                    template["EmbeddedTmpl"] = f"<contents of {source}>"
    return copied


def test_golden() -> None:
    """The rendered runner jobs equal the golden file (PYEXEC_UPDATE_GOLDEN=1 rewrites it)."""
    rendered = without_script(nomad_job.runner_jobs(golden_settings()))
    if os.environ.get("PYEXEC_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(rendered, indent=2, sort_keys=True) + "\n")
    assert rendered == json.loads(GOLDEN.read_text())


def test_every_task_ships_the_services_own_modules_verbatim() -> None:
    """Each task's code templates hold the service's modules as they are, untouched by
    template delimiters; the run task gets the tar rules the API applies."""
    job = nomad_job.runner_job(Settings(), Settings().nomad_resource_classes[0], pip=True)
    shipped = {}
    for task in job["TaskGroups"][0]["Tasks"]:
        for template in task["Templates"]:
            source = nomad_job.TASK_FILES.get(template["DestPath"])
            if source is None:
                continue
            assert template["EmbeddedTmpl"] == (ROOT / source).read_text()
            assert nomad_job.LEFT_DELIM not in template["EmbeddedTmpl"]
            assert nomad_job.RIGHT_DELIM not in template["EmbeddedTmpl"]
            assert (template["LeftDelim"], template["RightDelim"]) == ("[[[pyexec", "pyexec]]]")
            shipped.setdefault(task["Name"], []).append(source)
    assert shipped == {
        "install": ["pyexec/taskscripts/nomad_install.py"],
        "run": [
            "pyexec/taskscripts/nomad_run.py",
            "pyexec/sandbox/tarcheck.py",
            "pyexec/sandbox/collect.py",
        ],
        "finish": [
            "pyexec/taskscripts/nomad_finish.py",
            "pyexec/sandbox/tarcheck.py",
            "pyexec/sandbox/collect.py",
        ],
    }


def test_the_run_task_gets_its_inputs_from_the_client_not_from_consul() -> None:
    """The tar, manifest and record are templates the Nomad client renders from this
    prefix's keys; the run task itself has no Consul address and no token."""
    settings = Settings(consul_prefix="team/pyexec")
    run = _task(nomad_job.runner_job(settings, settings.nomad_resource_classes[0]), "run")
    inputs = {t["DestPath"]: t["EmbeddedTmpl"] for t in run["Templates"] if "LeftDelim" not in t}
    meta = '(env "NOMAD_META_execution_id")'
    assert inputs == {
        "local/bundle.tar": '{{ range ls (printf "team/pyexec/executions/%s/tar" '
        + meta
        + ") }}{{ .Value }}{{ end }}",
        "local/manifest.json": '{{ keyOrDefault (printf "team/pyexec/executions/%s/manifest" '
        + meta
        + ') "" }}',
        "local/record.json": '{{ keyOrDefault (printf "team/pyexec/executions/%s/record" '
        + meta
        + ') "" }}',
    }
    assert all(t["ChangeMode"] == "noop" for t in run["Templates"])
    assert not any("CONSUL" in name for name in run["Env"])


def test_the_writer_agrees_with_the_service_on_keys_and_statuses() -> None:
    """The finish task's keys come from consul_keys, each reason's status from Reason."""
    from pyexec.models import Reason
    from pyexec.store import consul_keys

    settings = Settings(consul_prefix="p")
    finish = _task(nomad_job.runner_job(settings, settings.nomad_resource_classes[0]), "finish")
    env = finish["Env"]
    eid = "${NOMAD_META_execution_id}"
    assert env["PYEXEC_RECORD_KEY"] == consul_keys.record_key("p", eid)
    assert env["PYEXEC_STATUS_KEY"] == consul_keys.status_key("p", eid)
    assert json.loads(env["PYEXEC_STATUS_OF"]) == {r.value: r.status.value for r in Reason}
    assert finish["Lifecycle"] == {"Hook": "poststop", "Sidecar": False}
    assert finish["Config"]["image"] == settings.default_image


def test_one_job_per_class() -> None:
    """Each resource class gets its job and its -pip variant with the class's resources."""
    settings = Settings(
        nomad_resource_classes=(
            ResourceClass("tiny", 100, 128, 64),
            ResourceClass("big", 4000, 16384, 8192),
        )
    )
    jobs = {job["ID"]: job for job in nomad_job.runner_jobs(settings)}
    assert set(jobs) == {
        "pyexec-runner-tiny",
        "pyexec-runner-tiny-pip",
        "pyexec-runner-big",
        "pyexec-runner-big-pip",
    }
    run = _task(jobs["pyexec-runner-big"], "run")
    assert run["Resources"] == {"CPU": 4000, "MemoryMB": 16384}
    assert run["Config"]["mount"][0] == {
        "type": "tmpfs",
        "target": "/work",
        "readonly": False,
        "tmpfs_options": {"size": 8192 * 1024 * 1024},
    }
    assert [t["Name"] for t in jobs["pyexec-runner-big"]["TaskGroups"][0]["Tasks"]] == [
        "run",
        "finish",
    ]
    assert [t["Name"] for t in jobs["pyexec-runner-big-pip"]["TaskGroups"][0]["Tasks"]] == [
        "install",
        "run",
        "finish",
    ]


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
    assert config["entrypoint"][0] == "python3"  # the image's own ENTRYPOINT never runs
    assert config["runtime"] == "runc"
    assert config["ulimit"] == [{"nofile": "4096:4096"}]
    assert "Lifecycle" not in run


def test_the_run_task_gets_the_sandboxs_seccomp_profile_and_runtime() -> None:
    """The run task uses the seccomp profile at PYEXEC_NOMAD_SECCOMP_PROFILE (a path on the
    client: the driver reads the file) and PYEXEC_DOCKER_RUNTIME; without a profile,
    Docker's default one applies."""
    settings = Settings(docker_runtime="runsc", nomad_seccomp_profile="/etc/pyexec/seccomp.json")
    run = _task(nomad_job.runner_job(settings, settings.nomad_resource_classes[0]), "run")
    assert run["Config"]["security_opt"] == [
        "no-new-privileges",
        "seccomp=/etc/pyexec/seccomp.json",
    ]
    assert run["Config"]["runtime"] == "runsc"
    default = _task(nomad_job.runner_job(Settings(), Settings().nomad_resource_classes[0]), "run")
    assert default["Config"]["security_opt"] == ["no-new-privileges"]


@pytest.mark.parametrize("pip", [False, True])
def test_only_the_run_task_runs_the_requests_image_and_never_with_network(pip: bool) -> None:
    """With PYEXEC_SETUP_NETWORK off (the default), every registered job's tasks whose
    image the request names have network_mode none; the installer and the writer run the
    operator's trusted image; there is no setup variant."""
    settings = Settings(nomad_trusted_image="registry.example/pyexec-trusted:1")
    assert not settings.setup_network
    jobs = nomad_job.runner_jobs(settings)
    assert not [j["ID"] for j in jobs if j["ID"].endswith("-setup")]
    for job in jobs:
        for task in job["TaskGroups"][0]["Tasks"]:
            if "NOMAD_META" in task["Config"]["image"]:
                assert task["Name"] == "run"
                assert task["Config"]["network_mode"] == "none"
            else:
                assert task["Config"]["image"] == "registry.example/pyexec-trusted:1"


@pytest.mark.parametrize("pip", [False, True])
def test_with_setup_network_only_the_setup_task_of_the_requests_image_has_network(
    pip: bool,
) -> None:
    """With PYEXEC_SETUP_NETWORK=true the -setup variants add a prestart setup task in the
    request's image on its own bridge network (never host), phase setup only; the run
    task that runs the program still has network_mode none and takes /work from it."""
    settings = Settings(setup_network=True, nomad_consul_addr="http://127.0.0.1:8500")
    job = nomad_job.runner_job(settings, settings.nomad_resource_classes[0], pip=pip, setup=True)
    assert job["ID"] == "pyexec-runner-small" + ("-pip" if pip else "") + "-setup"
    tasks = job["TaskGroups"][0]["Tasks"]
    names = [t["Name"] for t in tasks]
    assert names == (["install"] if pip else []) + ["setup", "run", "finish"]
    setup, run = _task(job, "setup"), _task(job, "run")
    assert setup["Lifecycle"] == {"Hook": "prestart", "Sidecar": False}
    assert setup["Config"]["network_mode"] == "bridge"  # host is what the trusted tasks get
    assert setup["Env"]["PYEXEC_PHASE"] == "setup"
    assert ("PYEXEC_WAIT_INSTALL" in setup["Env"]) is pip
    assert run["Config"]["network_mode"] == "none"
    assert run["Env"]["PYEXEC_PHASE"] == "run"
    assert run["Env"]["PYEXEC_WORK_BYTES"] == str(
        settings.nomad_resource_classes[0].disk_mb * 1024 * 1024
    )
    # Apart from the network, the setup task is the run task's sandbox.
    for key in ("readonly_rootfs", "cap_drop", "security_opt", "pids_limit", "runtime", "mount"):
        assert setup["Config"][key] == run["Config"][key]
    assert setup["User"] == run["User"] == "1000"
    for task in tasks:
        if "NOMAD_META" in task["Config"]["image"]:
            assert task["Name"] in ("setup", "run")
            assert (task["Config"]["network_mode"] == "none") is (task["Name"] == "run")
    ids = {j["ID"] for j in nomad_job.runner_jobs(settings)}
    assert {"pyexec-runner-small-setup", "pyexec-runner-small-pip-setup"} <= ids


def test_installer_installs_wheels_only() -> None:
    """The requirements installer asks pip for wheels only: no package build script runs."""
    settings = Settings()
    job = nomad_job.runner_job(settings, settings.nomad_resource_classes[0], pip=True)
    install = _task(job, "install")
    assert install["Lifecycle"] == {"Hook": "prestart", "Sidecar": False}
    assert install["Env"]["PYEXEC_PIP_ONLY_BINARY"] == ":all:"


def test_operator_task_env_reaches_every_task() -> None:
    """PYEXEC_NOMAD_TASK_ENV is added to every task's environment."""
    settings = Settings(nomad_task_env=(("HTTP_PROXY", "http://proxy:3128"),))
    job = nomad_job.runner_job(settings, settings.nomad_resource_classes[0], pip=True)
    for task in job["TaskGroups"][0]["Tasks"]:
        assert task["Env"]["HTTP_PROXY"] == "http://proxy:3128"


def test_consul_token_template_is_guarded() -> None:
    """The writer's token comes from a Nomad variable through a lookup that renders nothing
    (instead of blocking the task) while the variable does not exist."""
    settings = Settings(nomad_consul_token_variable="nomad/jobs/pyexec-writer")
    finish = _task(nomad_job.runner_job(settings, settings.nomad_resource_classes[0]), "finish")
    (token,) = [t for t in finish["Templates"] if t.get("Envvars")]
    assert token["EmbeddedTmpl"].startswith('{{ range nomadVarList "nomad/jobs/pyexec-writer" }}')
    assert "{{ if eq .Path " in token["EmbeddedTmpl"]
    assert token["DestPath"].startswith("secrets/")


def test_code_never_runs_twice() -> None:
    """No restart and no reschedule: a failed run is reported, never repeated."""
    group = nomad_job.runner_job(Settings(), Settings().nomad_resource_classes[0])["TaskGroups"][0]
    assert group["RestartPolicy"]["Attempts"] == 0
    assert group["RestartPolicy"]["Mode"] == "fail"
    assert group["ReschedulePolicy"] == {"Attempts": 0, "Unlimited": False}


def test_ca_bundle_reaches_the_installer_only(tmp_path: Path) -> None:
    """PYEXEC_CA_BUNDLE is shipped to the installer task as a template, with pip's variables."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    job = nomad_job.runner_job(
        Settings(ca_bundle=str(bundle)), Settings().nomad_resource_classes[0], pip=True
    )
    install = _task(job, "install")
    (ca,) = [t for t in install["Templates"] if t["DestPath"] == "local/ca-bundle.crt"]
    assert ca["EmbeddedTmpl"] == bundle.read_text()
    assert install["Env"]["PIP_CERT"] == install["Env"]["SSL_CERT_FILE"] == "/local/ca-bundle.crt"
    for name in ("run", "finish"):
        assert all("ca-bundle" not in t["DestPath"] for t in _task(job, name)["Templates"])


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
        try:
            return json.loads(value)
        except ValueError:  # an interpolation with quotes inside: "x=${file("y")}"
            return value[1:-1]
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
    """A ``file("x")`` template's path; any other data as it is."""
    match = re.fullmatch(r'\$\{file\("([^"]+)"\)\}', data)
    return match.group(1) if match else data


def _hcl_template(t: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = {
        "EmbeddedTmpl": _file_ref(t["data"]),
        "DestPath": t["destination"],
        "ChangeMode": t["change_mode"],
        "Perms": t["perms"],
    }
    if "left_delimiter" in t:
        template |= {"LeftDelim": t["left_delimiter"], "RightDelim": t["right_delimiter"]}
    if "env" in t:
        template["Envvars"] = t["env"]
    return template


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
        "Templates": [_hcl_template(t) for t in body.get("template", [])],
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
    """jobs/pyexec-runner.nomad.hcl is the function's small-class job, field for field; its
    code templates file() the modules the function embeds."""
    settings = Settings()
    expected = nomad_job.runner_job(settings, settings.nomad_resource_classes[0])
    for task in expected["TaskGroups"][0]["Tasks"]:
        for template in task["Templates"]:
            source = nomad_job.TASK_FILES.get(template["DestPath"])
            if source is not None:
                assert template["EmbeddedTmpl"] == (ROOT / source).read_text()
                template["EmbeddedTmpl"] = source
    assert hcl_as_api_json(HCL) == expected


def _task(job: dict[str, Any], name: str) -> dict[str, Any]:
    (task,) = [t for t in job["TaskGroups"][0]["Tasks"] if t["Name"] == name]
    return task


@pytest.mark.parametrize("source", sorted(set(nomad_job.TASK_FILES.values())))
def test_task_modules_parse_as_python_3_8(source: str) -> None:
    """The modules the tasks run parse with Python 3.8's grammar (images' Pythons vary)."""
    import ast

    ast.parse((ROOT / source).read_text(), feature_version=(3, 8))


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
def test_trusted_tasks_use_bridge_unless_consul_is_on_loopback(task_consul: str, mode: str) -> None:
    """The installer and the writer get their own network namespace unless Consul is only on
    loopback; the run task never has a network."""
    settings = Settings(nomad_consul_addr=task_consul)
    job = nomad_job.runner_job(settings, settings.nomad_resource_classes[0], pip=True)
    assert _task(job, "install")["Config"]["network_mode"] == mode
    assert _task(job, "finish")["Config"]["network_mode"] == mode
    assert _task(job, "run")["Config"]["network_mode"] == "none"


def test_operator_templates_reach_the_trusted_tasks_unless_they_name_others(
    tmp_path: Path,
) -> None:
    """PYEXEC_NOMAD_TEMPLATES adds templates to install and finish by default, to the run
    task only when it is named."""
    path = tmp_path / "templates.json"
    pip_conf = {"EmbeddedTmpl": "[global]\nindex-url = https://pypi.internal/simple\n",
                "DestPath": "local/pip.conf"}  # fmt: skip
    site = {"EmbeddedTmpl": "print('hi')\n", "DestPath": "local/site.py", "Tasks": ["run"]}
    path.write_text(json.dumps([pip_conf, site]))
    settings = Settings(nomad_templates=str(path))
    job = nomad_job.runner_job(settings, settings.nomad_resource_classes[0], pip=True)
    dests = {
        t["Name"]: [x["DestPath"] for x in t["Templates"]] for t in job["TaskGroups"][0]["Tasks"]
    }
    assert "local/pip.conf" in dests["install"]
    assert "local/pip.conf" in dests["finish"]
    assert "local/pip.conf" not in dests["run"]
    assert "local/site.py" in dests["run"]
    assert all("Tasks" not in x for t in job["TaskGroups"][0]["Tasks"] for x in t["Templates"])


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"DestPath": "x"}',
        '[{"EmbeddedTmpl": "x"}]',
        '[{"DestPath": "x", "Tasks": ["bogus"]}]',
    ],
)
def test_bad_operator_templates_are_a_settings_error(tmp_path: Path, content: str) -> None:
    """A templates file that is not a list of templates for known tasks is refused."""
    path = tmp_path / "templates.json"
    path.write_text(content)
    with pytest.raises(SettingsError, match="PYEXEC_NOMAD_TEMPLATES"):
        nomad_job.runner_jobs(Settings(nomad_templates=str(path)))


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        ("six", False),
        ("requests[socks]>=2.31 ; python_version >= '3.8'  # http", False),
        ("# a comment", False),
        ("", False),
        ("pkg @ https://files.example/pkg-1.0-py3-none-any.whl", False),
        ("-e git+https://github.com/x/y#egg=y", True),
        ("--index-url https://evil.example/simple", True),
        ("-r other.txt", True),
        ("git+https://github.com/x/y", True),
        ("pkg @ https://files.example/pkg-1.0.tar.gz", True),
        ("./local/dir", True),
        ("file:///tmp/pkg.zip", True),
    ],
)
def test_requirements_the_wheel_installer_cannot_take_are_known_at_submit(
    line: str, refused: bool
) -> None:
    """Lines that would need a source build, another file or another index are refused."""
    assert (nomad_job.requirement_problem(line) is not None) is refused
