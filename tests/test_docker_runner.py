"""DockerRunner against the real engine: the sandbox's walls, the limits, setup, cleanup."""

from __future__ import annotations

import gc
import io
import json
import os
import socket
import struct
import tarfile
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import docker
import psutil
import pytest

from pyexec.artifacts import blob_overhead
from pyexec.errors import BackendError, BackendUnavailable, NotFound
from pyexec.models import Execution, Reason, Status, new_execution_id, parse_request
from pyexec.runner.docker import DockerRunner
from pyexec.runner.docker_engine import Engine, owner_label
from pyexec.runner.docker_spec import (
    CPU_BACKSTOP_SLACK,
    LABEL_EXECUTION,
    LABEL_MANAGED,
    LABEL_NONCE,
    LABEL_OWNER,
    LABEL_PHASE,
    LOG_SLACK_BYTES,
    NOFILE,
    RUNSC_MEMORY_OVERHEAD_MB,
    RUNSC_PIDS_OVERHEAD,
    Phase,
    container_args,
    disk_shares,
    plan,
    volume_args,
)
from pyexec.runner.docker_stream import Capture, Demux
from pyexec.runner.docker_verdict import Ending, verdict
from pyexec.sandbox import seccomp_profile
from pyexec.sandbox.wire import ControlLine, Trailer
from pyexec.settings import Settings, SettingsError

from .conftest import CA_BUNDLE, TEST_IMAGE, make_settings
from .fixtures_docker import (
    Gate,
    GatedAPI,
    Started,
    docker_client,
    execute,
    gated_client,
    leftovers,
    runtime_registered,
    start,
    tar_chunks,
)
from .tarfiles import make_tar

__all__ = ["docker_client", "gated_client"]  # fixtures, imported to be found by pytest

MiB = 1024 * 1024
FILES = {"main.py": "print('hi')\n"}


#: Every verdict test runs under each runtime (``runsc``: gVisor, see scripts/bootstrap.sh).
RUNTIMES = pytest.mark.parametrize("runtime", ["runc", "runsc"])


#: Verdict tests run on a fresh container and on a pooled sandbox made for their shape.
PATHS = pytest.mark.parametrize("path", ["cold", "pooled"])


@pytest.fixture
def path() -> str:
    """How the test's runs get their sandbox; verdict tests parametrize it (``PATHS``)."""
    return "cold"


@pytest.fixture
def runtime() -> str:
    """The OCI runtime of the test's sandboxes; verdict tests parametrize it (``RUNTIMES``)."""
    return "runc"


@pytest.fixture
def settings(runtime: str, docker_client: docker.DockerClient) -> Settings:
    if runtime != "runc" and not runtime_registered(docker_client, runtime):
        pytest.skip(f"dockerd has no runtime {runtime!r} (scripts/bootstrap.sh registers runsc)")
    # The runner runs what a request asks; the server's network policy is checked at parse.
    return make_settings(
        default_timeout=20,
        default_memory_mb=128,
        default_disk_mb=32,
        docker_runtime=runtime,
        allow_network=True,
        setup_network=True,
    )


@pytest.fixture
async def runner(
    settings: Settings, docker_client: docker.DockerClient, path: str
) -> AsyncIterator[DockerRunner]:
    runner = DockerRunner(settings, docker_client, pooled=path == "pooled")
    if runner.pool is not None:
        runner.pool.start()
    try:
        yield runner
    finally:
        await runner.aclose()


def request_for(settings: Settings, **metadata: Any) -> Any:
    return parse_request(metadata, settings)


# --- The container spec, as data ----------------------------------------------------------


def test_plan_uses_one_container_unless_setup_needs_another_network(settings: Settings) -> None:
    """No setup, or setup with the run's network policy: one container; else setup + run."""
    plain = request_for(settings)
    assert plan(plain, settings) == (Phase(extract=True, setup=False, run=True, network=False),)
    with_setup = request_for(settings, pre_commands=["true"])
    assert [p.network for p in plan(with_setup, settings)] == [True, False]
    offline = attrs.evolve(settings, setup_network=False)
    assert plan(with_setup, offline) == (Phase(extract=True, setup=True, run=True, network=False),)
    online = request_for(settings, pre_commands=["true"], config={"network_disabled": False})
    assert len(plan(online, settings)) == 1


def test_container_args_lock_the_sandbox_down(settings: Settings) -> None:
    """The run container: uid 1000, no network, read-only root, capped tmpfs, no swap, no logs."""
    request = request_for(settings, config={"memory_mb": 64, "disk_mb": 8, "pids_limit": 50})
    phase = plan(request, settings)[0]
    args = container_args(settings, request, "exe_x", phase, owner="h:1")
    host = args["host_config"]
    assert args["user"] == "1000:1000"
    assert args["entrypoint"] == []  # the image's ENTRYPOINT never wraps the bootstrap
    assert args["command"][:4] == ["python3", "-I", "-S", "-c"]
    assert args["working_dir"] == "/work"
    assert "HOME=/work" in args["environment"]
    assert args["labels"] == {
        LABEL_MANAGED: "1",
        LABEL_EXECUTION: "exe_x",
        LABEL_OWNER: "h:1",
        "pyexec.phase": "run",
    }
    assert host["network_mode"] == "none"
    assert host["read_only"] is True
    assert host["mem_limit"] == host["memswap_limit"] == 64 * MiB
    assert host["pids_limit"] == 50
    assert host["cap_drop"] == ["ALL"]
    assert host["security_opt"] == ["no-new-privileges", f"seccomp={seccomp_profile()}"]
    # The engine keeps a run's output (bounded) for a service restarted meanwhile.
    assert host["log_config"]["Type"] == "local"
    # Room for the artifacts' tar too (the default cap when none are asked for).
    assert int(host["log_config"]["Config"]["max-size"]) == 4 * request.config.max_output_bytes + (
        LOG_SLACK_BYTES + settings.default_max_artifact_bytes + blob_overhead()
    )
    assert "size=6144k" in host["tmpfs"]["/work"]
    assert "uid=1000" in host["tmpfs"]["/work"]
    assert "/proc/meminfo" in args["host_config_extra"]["MaskedPaths"]


def test_an_artifacts_nonce_is_a_label_and_its_tar_fits_the_log(settings: Settings) -> None:
    """A run asking for artifacts carries its mark's nonce as a label (for a restarted
    service) and its engine log has room for its artifacts' cap."""
    request = request_for(settings, artifacts=["*"], config={"max_artifact_bytes": 1000})
    args = container_args(settings, request, "exe_x", plan(request, settings)[0], nonce="ab12")
    assert args["labels"][LABEL_NONCE] == "ab12"
    size = int(args["host_config"]["log_config"]["Config"]["max-size"])
    assert size == 4 * request.config.max_output_bytes + LOG_SLACK_BYTES + 1000 + blob_overhead()


def test_disk_budget_covers_work_tmp_and_shm() -> None:
    """/work, /tmp and /dev/shm together get exactly disk_mb; the scratch mounts stay small."""
    for disk_mb in (1, 8, 64, 1024, 10_000):
        shares = disk_shares(disk_mb)
        assert shares.work + shares.tmp + shares.shm == disk_mb * 1024
        assert 0 < shares.tmp == shares.shm <= 64 * 1024
        assert shares.work >= disk_mb * 1024 * 3 // 4


def test_seccomp_profile_allows_a_list_and_denies_tracing() -> None:
    """The shipped profile is an allow-list (EPERM by default) whose rules never
    contradict each other, and it denies ptrace, process_vm_* and personality."""
    profile = json.loads(seccomp_profile())
    assert (profile["defaultAction"], profile["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", 1)
    allowed: set[str] = set()
    denied: set[str] = set()
    for rule in profile["syscalls"]:
        names = set(rule["names"])
        if rule["action"] == "SCMP_ACT_ALLOW":
            assert not names & allowed or rule.get("args"), names & allowed
            allowed |= names
        else:
            denied |= names
    assert {"ptrace", "process_vm_readv", "process_vm_writev", "personality"} <= denied
    assert {"io_uring_setup", "bpf", "unshare", "setns", "mount", "keyctl"} <= denied
    assert not allowed & denied, allowed & denied


def test_container_args_use_the_configured_runtime(settings: Settings) -> None:
    """PYEXEC_DOCKER_RUNTIME picks the OCI runtime of every sandbox container (runc by default)."""
    request = request_for(settings, pre_commands=["true"])
    assert settings.docker_runtime == "runc"
    gvisor = attrs.evolve(settings, docker_runtime="runsc")
    for phase in plan(request, gvisor):
        host = container_args(gvisor, request, "exe_x", phase, "vol")["host_config"]
        assert host["runtime"] == "runsc"
        # gVisor's own threads and memory share the cgroups with the program.
        assert host["pids_limit"] == request.config.pids_limit + RUNSC_PIDS_OVERHEAD
        assert host["mem_limit"] == (request.config.memory_mb + RUNSC_MEMORY_OVERHEAD_MB) * MiB


def test_runtime_setting_is_a_runtime_name() -> None:
    """PYEXEC_DOCKER_RUNTIME takes a name as dockerd registers it; anything else is refused."""
    assert Settings.from_env({"PYEXEC_DOCKER_RUNTIME": "runsc"}).docker_runtime == "runsc"
    for bad in ("", "run sc", "--privileged", "../runc"):
        with pytest.raises(SettingsError):
            Settings.from_env({"PYEXEC_DOCKER_RUNTIME": bad})


def test_work_is_nosuid_nodev_as_a_tmpfs_and_as_a_volume(settings: Settings) -> None:
    """/work gets nosuid and nodev whether it is the container's tmpfs or a setup volume."""
    request = request_for(settings, config={"disk_mb": 8})
    tmpfs = container_args(settings, request, "exe_x", plan(request, settings)[0])
    volume = volume_args(request, "exe_x", "h:1")
    for options in (tmpfs["host_config"]["tmpfs"]["/work"], volume["driver_opts"]["o"]):
        assert {"nosuid", "nodev", "size=6144k"} <= set(options.split(","))


def test_ca_bundle_is_mounted_into_setup_containers_only(settings: Settings) -> None:
    """With a CA bundle set, the setup container mounts it read-only; the run container does not."""
    with_ca = attrs.evolve(settings, ca_bundle=CA_BUNDLE)
    request = request_for(with_ca, requirements_txt="six")
    setup, run = plan(request, with_ca)
    mounts = container_args(with_ca, request, "exe_x", setup, "vol")["host_config"]["mounts"]
    assert {(m["Source"], m["ReadOnly"]) for m in mounts} == {("vol", False), (CA_BUNDLE, True)}
    run_mounts = container_args(with_ca, request, "exe_x", run, "vol")["host_config"]["mounts"]
    assert [m["Source"] for m in run_mounts] == ["vol"]


SETUP_ONLY = Phase(extract=True, setup=True, run=False, network=True)
SETUP_AND_RUN = Phase(extract=True, setup=True, run=True, network=False)
RUN_ONLY = Phase(extract=False, setup=False, run=True, network=False)


@pytest.mark.parametrize(
    ("ending", "expected"),
    [
        # a limit the runner enforced wins over a kill and an exit at the same moment
        (
            Ending(phase=RUN_ONLY, status="ready", exited=0, limit=Reason.TIMEOUT, killed=True),
            Reason.TIMEOUT,
        ),
        # the same limit before the setup was over is a failed setup
        (
            Ending(phase=SETUP_AND_RUN, status=None, exited=137, limit=Reason.OUTPUT_LIMIT),
            Reason.SETUP_FAILED,
        ),
        # a kill wins over the program's own exit and over memory
        (Ending(phase=RUN_ONLY, status="ready", exited=0, killed=True), Reason.KILLED),
        (Ending(phase=RUN_ONLY, status="ready", exited=137, killed=True, oom=True), Reason.KILLED),
        # a kill during setup is a kill, not a failed setup
        (Ending(phase=SETUP_ONLY, status=None, exited=137, killed=True), Reason.KILLED),
        # memory: oom in the run, a failed setup before the program ran
        (Ending(phase=RUN_ONLY, status="ready", exited=137, oom=True), Reason.OOM),
        (Ending(phase=SETUP_AND_RUN, status=None, exited=137, oom=True), Reason.SETUP_FAILED),
        # no control line at all: the sandbox never started the program
        (Ending(phase=RUN_ONLY, status=None, exited=1), Reason.ERROR),
        # the program's own exit, whatever its code
        (Ending(phase=SETUP_AND_RUN, status="ready", exited=137, ended="exit"), Reason.EXITED),
        # the sandbox's own deadline, without the runner's
        (Ending(phase=RUN_ONLY, status="ready", exited=137, ended="timeout"), Reason.TIMEOUT),
        # SIGKILL that took the bootstrap too (no trailer): memory, however the engine saw it
        (Ending(phase=RUN_ONLY, status="ready", exited=137), Reason.OOM),
        (Ending(phase=RUN_ONLY, status="ready", exited=1), Reason.EXITED),
        (Ending(phase=SETUP_ONLY, status=None, exited=137), Reason.SETUP_FAILED),
        # stopped from outside (the engine shutting down): not the program's own exit
        (Ending(phase=RUN_ONLY, status="ready", exited=143, ended="stopped"), Reason.ERROR),
        # a setup-only container that succeeded does not end the execution
        (Ending(phase=SETUP_ONLY, status="setup_ok", exited=0), None),
    ],
)
def test_verdict_precedence(ending: Ending, expected: Reason | None) -> None:
    """When several endings coincide, the verdict follows one fixed order."""
    decided = verdict(ending)
    assert (decided and decided[0]) == expected, decided


def test_setup_killed_for_memory_says_so() -> None:
    """A setup step that failed because of memory names the memory limit in the error."""
    ending = Ending(
        phase=SETUP_ONLY,
        status="setup_failed",
        message="setup step 'pip install' exited with -9",
        exited=1,
        oom=True,
        memory_mb=64,
    )
    assert verdict(ending) == (
        Reason.SETUP_FAILED,
        "setup step 'pip install' exited with -9 (killed for using more than 64 MiB of memory)",
    )


def test_demux_reassembles_frames_split_anywhere() -> None:
    """Docker's 8-byte-header frames parse the same however the bytes are chunked."""
    frames = [(1, b"hello "), (2, b"oops"), (1, b""), (1, b"world" * 1000)]
    wire = b"".join(struct.pack(">BxxxL", kind, len(data)) + data for kind, data in frames)
    for size in (1, 3, 7, 8, 9, 4096, len(wire)):
        demux = Demux()
        got: dict[int, bytes] = {1: b"", 2: b""}
        for offset in range(0, len(wire), size):
            for kind, data in demux.feed(wire[offset : offset + size]):
                got[kind] += data
        assert got == {1: b"hello " + b"world" * 1000, 2: b"oops"}


def test_capture_keeps_whole_characters_at_the_cap() -> None:
    """A capped stream drops a multibyte character cut in half rather than mangling it."""
    for limit in range(1, 12):
        capture = Capture(limit)
        assert not capture.feed("a😀é".encode() * 3)
        text = capture.text()
        assert "\ufffd" not in text
        assert ("a😀é" * 3).startswith(text)
        assert len(text.encode()) <= limit


def test_trailer_is_split_from_the_programs_stderr_wherever_chunks_break() -> None:
    """The bootstrap's last stderr line is recognised across any chunking and removed;
    one the program prints earlier, or a cut-off one, stays the program's text."""
    stream = b"warn\0x\n" + b"\0pyexec end timeout 137\n"
    for cut in range(len(stream) + 1):
        trailer = Trailer()
        kept = trailer.feed(stream[:cut]) + trailer.feed(stream[cut:]) + trailer.finish()
        assert (kept, trailer.kind, trailer.code) == (b"warn\0x\n", "timeout", 137), cut
    forged = Trailer()
    text = b"\0pyexec end exit 0\nmore\n"
    assert forged.feed(text) + forged.finish() == text
    assert forged.kind is None
    cut_off = Trailer()
    assert cut_off.feed(b"err\0pyexec en") + cut_off.finish() == b"err\0pyexec en"
    assert cut_off.kind is None


def test_control_line_is_split_from_the_programs_output() -> None:
    """The bootstrap's first stdout line is parsed and stripped, even when it arrives in bits."""
    control = ControlLine()
    assert control.feed(b"\0pyexec setup_fai") == b""
    assert not control.done
    assert control.feed(b"led step 'x' exited with 3\npip output\n") == b"pip output\n"
    assert (control.status, control.message) == ("setup_failed", "step 'x' exited with 3")
    stray = ControlLine()
    stray.feed(b"not the bootstrap\n")
    assert stray.status == "error"


# --- Running for real -------------------------------------------------------------------------


PROBE = """
import json, os
facts = {"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
         "home": os.environ.get("HOME"), "net": sorted(os.listdir("/sys/class/net"))}
for path in ("/etc/pyexec-probe", "/usr/pyexec-probe", "/pyexec-probe"):
    try:
        open(path, "w").write("x")
        facts[path] = "written"
    except OSError as exc:
        facts[path] = exc.errno
open("/work/probe.txt", "w").write("ok")
facts["work"] = open("/work/probe.txt").read()
print(json.dumps(facts))
"""


@pytest.mark.docker
@pytest.mark.anyio
@PATHS
async def test_sandbox_walls(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """uid 1000, only loopback, read-only root, writable /work as cwd and HOME."""
    outcome = await execute(runner, docker_client, settings, {"main.py": PROBE})
    assert outcome.reason is Reason.EXITED, outcome
    facts = json.loads(outcome.stdout)
    assert facts["uid"] == 1000
    assert facts["gid"] == 1000
    assert facts["net"] == ["lo"]
    assert facts["cwd"] == "/work"
    assert facts["home"] == "/work"
    assert facts["work"] == "ok"
    erofs = 30
    assert [facts[p] for p in ("/etc/pyexec-probe", "/usr/pyexec-probe", "/pyexec-probe")] == [
        erofs
    ] * 3


@pytest.mark.docker
@pytest.mark.anyio
@PATHS
async def test_work_is_capped_by_disk_mb(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """Writing more than disk_mb into /work fails with ENOSPC."""
    code = """
import errno
try:
    with open("big", "wb") as fh:
        for _ in range(40):
            fh.write(b"x" * 1024 * 1024)
    print("wrote all")
except OSError as exc:
    print("ENOSPC" if exc.errno == errno.ENOSPC else exc)
"""
    outcome = await execute(
        runner, docker_client, settings, {"main.py": code}, config={"disk_mb": 8}
    )
    assert outcome.stdout.strip() == "ENOSPC", outcome


HOST_DETAILS = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
facts = {}
for name, call in (("ptrace", lambda: libc.ptrace(16, 1, 0, 0)),  # PTRACE_ATTACH to init
                   ("personality", lambda: libc.personality(0x0040000)),  # ADDR_NO_RANDOMIZE
                   ("unshare", lambda: libc.unshare(0x10000000))):  # CLONE_NEWUSER
    facts[name] = (call(), errno.errorcode.get(ctypes.get_errno()))
facts["meminfo"] = open("/proc/meminfo").read()
facts["cmdline"] = open("/proc/cmdline").read()
facts["block"] = os.listdir("/sys/block")
facts["net"] = os.listdir("/sys/class/net")
facts["cpus"] = os.cpu_count()
print(json.dumps(facts))
"""


@pytest.mark.docker
@pytest.mark.anyio
@PATHS
async def test_seccomp_and_masked_paths_hide_the_host(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """ptrace of init, personality and unshare fail with EPERM; the program then exits by
    itself (not a timeout, init was never frozen); the host's memory, boot line and disks
    are not readable, while what libc needs (the CPU count, /sys/class/net) still is."""
    outcome = await execute(
        runner, docker_client, settings, {"main.py": HOST_DETAILS}, config={"timeout_seconds": 10}
    )
    assert (outcome.reason, outcome.exit_code) == (Reason.EXITED, 0), outcome
    facts = json.loads(outcome.stdout)
    for name in ("ptrace", "personality", "unshare"):
        assert facts[name] == [-1, "EPERM"], name
    assert facts["meminfo"] == facts["cmdline"] == ""
    assert facts["block"] == []
    assert facts["net"] == ["lo"]
    assert facts["cpus"] >= 1


SCRATCH = """
import errno, os
def fill(path):
    written = 0
    try:
        with open(path, "wb") as fh:
            while True:
                fh.write(b"x" * 65536)
                fh.flush()
                written += 65536
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    os.unlink(path)
    return written // 1024
print(fill("/tmp/fill"), fill("/dev/shm/fill"), fill("/work/fill"))
"""


@pytest.mark.docker
@pytest.mark.anyio
@PATHS
async def test_tmp_and_shm_are_writable_and_counted_in_disk_mb(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """/tmp and /dev/shm are writable tmpfs mounts, and with /work they hold no more than
    disk_mb in all."""
    outcome = await execute(
        runner, docker_client, settings, {"main.py": SCRATCH}, config={"disk_mb": 16}
    )
    assert outcome.reason is Reason.EXITED, outcome
    tmp, shm, work = map(int, outcome.stdout.split())
    assert tmp == shm == 2048
    assert 12 * 1024 <= work + tmp + shm <= 16 * 1024


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
@PATHS
async def test_stdin_env_args_and_exit_code_arrive(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """The program reads the request's stdin, sees env vars and args; its exit code passes."""
    code = """
import os, sys
print(repr(sys.stdin.read()), sys.argv[1:], os.environ["GREETING"])
print("to stderr", file=sys.stderr)
sys.exit(7)
"""
    outcome = await execute(
        runner,
        docker_client,
        settings,
        {"main.py": code},
        stdin="line one\nline two\n",
        env_vars=["GREETING=héllo"],
        script_args=["a b", "--c"],
    )
    assert outcome.reason is Reason.EXITED
    assert outcome.reason.status is Status.COMPLETED
    assert outcome.exit_code == 7
    assert outcome.stdout == "'line one\\nline two\\n' ['a b', '--c'] héllo\n"
    assert outcome.stderr == "to stderr\n"
    assert outcome.started_at is not None
    assert outcome.finished_at is not None


@pytest.mark.docker
@pytest.mark.anyio
async def test_nested_entrypoint_runs_in_work_with_its_package(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """A nested entrypoint imports its sibling modules; cwd is /work."""
    files = {
        "app/main.py": "import helper, os\nprint(helper.X, os.getcwd())\n",
        "app/helper.py": "X = 42\n",
    }
    outcome = await execute(runner, docker_client, settings, files, entrypoint="app/main.py")
    assert outcome.stdout == "42 /work\n", outcome


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
@PATHS
async def test_memory_hog_is_oom(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """Allocating past memory_mb ends as oom, not as an ordinary exit 137."""
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))\n"
    outcome = await execute(
        runner, docker_client, settings, {"main.py": code}, config={"memory_mb": 64}
    )
    assert outcome.reason is Reason.OOM, outcome
    assert outcome.reason.status is Status.FAILED


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
@PATHS
async def test_exit_137_by_itself_is_not_oom(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """A program that SIGKILLs itself exits 137 and is reported as exited."""
    code = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    outcome = await execute(runner, docker_client, settings, {"main.py": code})
    assert (outcome.reason, outcome.exit_code) == (Reason.EXITED, 137)


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
@PATHS
async def test_busy_loop_times_out_on_time(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """`while True: pass` with a 2 s timeout ends as timeout within 2 s plus a small slack."""
    before = time.monotonic()
    outcome = await execute(
        runner,
        docker_client,
        settings,
        {"main.py": "print('spinning', flush=True)\nwhile True: pass\n"},
        config={"timeout_seconds": 2},
    )
    elapsed = time.monotonic() - before
    assert outcome.reason is Reason.TIMEOUT, outcome
    assert outcome.stdout == "spinning\n"
    assert outcome.started_at is not None
    assert outcome.finished_at is not None
    ran = (outcome.finished_at - outcome.started_at).total_seconds()
    assert 2.0 <= ran < 3.0
    # Wall time adds container start and removal; generous, so a loaded CI stays green.
    assert elapsed < 2.0 + 10


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
@PATHS
async def test_closing_stdout_does_not_escape_the_timeout(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """A program that closes its output and keeps running still times out."""
    code = "import os\nos.close(1)\nos.close(2)\nwhile True: pass\n"
    outcome = await execute(
        runner, docker_client, settings, {"main.py": code}, config={"timeout_seconds": 2}
    )
    assert outcome.reason is Reason.TIMEOUT, outcome


@pytest.mark.docker
@pytest.mark.anyio
@PATHS
async def test_cpu_time_and_open_files_are_capped_in_the_container(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """A CPU-time rlimit past the timeout (in case the host dies) and an open-files cap."""
    code = (
        "import os, resource\n"
        "print(*resource.getrlimit(resource.RLIMIT_CPU), os.cpu_count())\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    outcome = await execute(
        runner, docker_client, settings, {"main.py": code}, config={"timeout_seconds": 5}
    )
    cpu, nofile = outcome.stdout.splitlines()
    soft, hard, cpus = map(int, cpu.split())
    assert soft == (5 + CPU_BACKSTOP_SLACK) * cpus
    assert hard == soft + 10
    assert nofile == f"{NOFILE} {NOFILE}"


@pytest.mark.docker
@pytest.mark.anyio
@PATHS
async def test_fork_bomb_is_contained_and_the_next_run_is_fine(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """Forking stops at pids_limit; the following execution runs normally."""
    code = """
import os, time
children = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as exc:
    print("stopped after", children, exc.errno)
"""
    outcome = await execute(
        runner, docker_client, settings, {"main.py": code}, config={"pids_limit": 16}
    )
    assert outcome.reason is Reason.EXITED, outcome
    words = outcome.stdout.split()
    assert words[:2] == ["stopped", "after"]
    assert int(words[2]) < 16
    after = await execute(runner, docker_client, settings, {"main.py": "print('fine')"})
    assert (after.reason, after.stdout) == (Reason.EXITED, "fine\n")


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
@PATHS
async def test_huge_output_is_cut_and_memory_stays_bounded(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """50 MB on stdout against a 1 MiB cap: output_limit, truncated, little memory used here."""
    code = "import sys\nchunk = 'x' * 65536\nfor _ in range(800):\n    sys.stdout.write(chunk)\n"
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    outcome = await execute(
        runner, docker_client, settings, {"main.py": code}, config={"max_output_bytes": MiB}
    )
    grown = process.memory_info().rss - before
    assert outcome.reason is Reason.OUTPUT_LIMIT, outcome.error
    assert outcome.output_truncated
    assert len(outcome.stdout) == MiB
    assert grown < 16 * MiB, grown


@pytest.mark.docker
@pytest.mark.anyio
async def test_collected_outcomes_are_not_hoarded(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """Once waited for, big outcomes are let go past 16 MiB; the newest stays readable."""
    code = "import sys\nsys.stdout.write('x' * (9 * 1024 * 1024))\n"
    ids = []
    for _ in range(2):
        files = {"main.py": code}
        started = await start(runner, settings, files, config={"max_output_bytes": 10 * MiB})
        assert len((await started.wait()).stdout) == 9 * MiB
        ids.append(started.execution_id)
    assert await runner.logs(ids[0]) == ("", "")
    with pytest.raises(NotFound):
        await runner.wait(ids[0], 1)
    assert len((await runner.logs(ids[1]))[0]) == 9 * MiB


@pytest.mark.docker
@pytest.mark.anyio
@PATHS
async def test_output_cap_never_splits_a_character(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """Cut mid-way through a two-byte character, the kept text ends on a whole character."""
    outcome = await execute(
        runner,
        docker_client,
        settings,
        {"main.py": "print('é' * 5000)"},
        config={"max_output_bytes": 1001},
    )
    assert outcome.reason is Reason.OUTPUT_LIMIT
    assert outcome.stdout == "é" * 500


@pytest.mark.docker
@pytest.mark.anyio
@pytest.mark.parametrize("setup_network", [True, False], ids=["two-containers", "one-container"])
async def test_pre_commands_run_before_the_script(
    docker_client: docker.DockerClient, settings: Settings, setup_network: bool
) -> None:
    """pre_commands run in /work first; the run phase still has no network."""
    settings = attrs.evolve(settings, setup_network=setup_network)
    runner = DockerRunner(settings, docker_client)
    try:
        code = (
            "import os\nprint(open('made.txt').read().strip(), os.listdir('/sys/class/net'))\n"
            "mount = [line for line in open('/proc/mounts') if ' /work ' in line][0]\n"
            "print({'nosuid', 'nodev'} <= set(mount.split()[3].split(',')))\n"
        )
        outcome = await execute(
            runner,
            docker_client,
            settings,
            {"main.py": code},
            pre_commands=["echo made-by-setup > made.txt", "test -f main.py"],
            stdin="unused",
        )
    finally:
        await runner.aclose()
    assert outcome.reason is Reason.EXITED, outcome
    assert outcome.stdout == "made-by-setup ['lo']\nTrue\n"
    assert outcome.stderr == ""


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
async def test_setup_failure_reports_setup_output(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """A failing pre_command ends as setup_failed with its output; the script never runs."""
    started = await start(
        runner,
        settings,
        {"main.py": "print('should not run')"},
        pre_commands=["echo preparing; echo broken >&2; exit 3", "echo never"],
    )
    outcome = await started.wait()
    assert outcome.reason is Reason.SETUP_FAILED, outcome
    assert outcome.reason.status is Status.FAILED
    assert outcome.stdout == "preparing\n"
    assert outcome.stderr == "broken\n"
    assert "exited with 3" in (outcome.error or "")
    assert started.running == []
    assert leftovers(docker_client, started.execution_id) == []


@pytest.mark.docker
@pytest.mark.anyio
async def test_a_pre_command_cannot_end_the_run_with_a_forged_setup_ok(
    docker_client: docker.DockerClient, settings: Settings
) -> None:
    """A pre_command writing 'setup_ok' to the bootstrap's stdout does not cut the run short."""
    settings = attrs.evolve(settings, setup_network=False)  # setup and run in one container
    runner = DockerRunner(settings, docker_client)
    forge = "printf '\\000pyexec setup_ok\\n' > /proc/$PPID/fd/1"
    try:
        outcome = await execute(
            runner, docker_client, settings, {"main.py": "print('ran')"}, pre_commands=[forge]
        )
    finally:
        await runner.aclose()
    assert outcome.reason is Reason.EXITED, outcome
    assert outcome.stdout.endswith("ran\n")


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
async def test_setup_has_its_own_timeout(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """A pre_command that outlives the budget ends the execution as setup_failed, on time."""
    before = time.monotonic()
    started = await start(
        runner,
        settings,
        {"main.py": "print('never')"},
        pre_commands=["echo waiting; sleep 60"],
        config={"timeout_seconds": 2},
    )
    outcome = await started.wait()
    assert outcome.reason is Reason.SETUP_FAILED, outcome
    assert "timed out after 2s" in (outcome.error or "")
    assert outcome.stdout == "waiting\n"
    assert time.monotonic() - before < 8
    assert started.running == []
    assert leftovers(docker_client, started.execution_id) == []


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
async def test_setup_out_of_memory_says_so(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """A pre_command killed for memory ends as setup_failed, and the error says why."""
    hog = 'python3 -c "x = bytearray(512 * 2**20)"'
    outcome = await execute(
        runner,
        docker_client,
        settings,
        {"main.py": "print('never')"},
        pre_commands=[hog],
        config={"memory_mb": 64},
    )
    assert outcome.reason is Reason.SETUP_FAILED, outcome
    assert "more than 64 MiB of memory" in (outcome.error or ""), outcome.error
    assert outcome.stdout == ""


@pytest.mark.docker
@pytest.mark.anyio
@PATHS
async def test_network_enabled_run_gets_an_interface(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """With network_disabled false the run has more than loopback (nothing is contacted)."""
    code = "import os\nprint(sorted(os.listdir('/sys/class/net')))\n"
    outcome = await execute(
        runner, docker_client, settings, {"main.py": code}, config={"network_disabled": False}
    )
    assert "'lo'" in outcome.stdout
    assert outcome.stdout != "['lo']\n"


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
@PATHS
async def test_kill_while_running(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """Killing a running execution ends it as killed with its output so far; again is a no-op."""
    code = "import time\nprint('first', flush=True)\ntime.sleep(60)\n"
    started = await start(runner, settings, {"main.py": code})
    await started.running_event.wait()
    deadline = time.monotonic() + 20
    while (await runner.logs(started.execution_id))[0] != "first\n":
        assert time.monotonic() < deadline, "the first line never arrived"
        await _tick()
    before = time.monotonic()
    await runner.kill(started.execution_id)
    outcome = await started.wait(timeout=10)
    assert time.monotonic() - before < 5
    assert outcome.reason is Reason.KILLED
    assert outcome.reason.status is Status.KILLED
    assert outcome.stdout == "first\n"
    assert leftovers(docker_client, started.execution_id) == []
    await runner.kill(started.execution_id)
    await runner.kill(new_execution_id())


async def _tick() -> None:
    await anyio.sleep(0.05)  # bounded poll of logs(); the output has no other signal


@pytest.mark.docker
@pytest.mark.anyio
async def test_aclose_removes_running_containers(
    settings: Settings, docker_client: docker.DockerClient
) -> None:
    """Shutting the runner down stops and removes what it runs."""
    runner = DockerRunner(settings, docker_client)
    started = await start(runner, settings, {"main.py": "import time\ntime.sleep(60)"})
    await started.running_event.wait()
    await runner.aclose()
    outcome = await started.wait(timeout=5)
    assert outcome.reason is Reason.ERROR
    assert leftovers(docker_client, started.execution_id) == []


@pytest.mark.docker
@pytest.mark.anyio
@RUNTIMES
@PATHS
async def test_unsafe_tar_is_refused_inside_the_sandbox_too(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """A tar that skipped validation is still refused by the bootstrap: error, nothing runs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("main.py")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"1\n"))
        link = tarfile.TarInfo("etc")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc"
        tar.addfile(link)
    outcome = await execute(runner, docker_client, settings, buf.getvalue())
    assert outcome.reason is Reason.ERROR
    assert "could not unpack" in (outcome.error or "")


@pytest.mark.docker
@pytest.mark.anyio
@pytest.mark.parametrize("setup", [False, True], ids=["plain", "with-setup-volume"])
async def test_missing_image_is_a_clear_error(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings, setup: bool
) -> None:
    """An image that is not here and cannot be pulled fails start with image_unavailable,
    leaving nothing behind (not even the setup volume)."""
    image = "127.0.0.1:9/pyexec-missing:never"  # a registry on loopback that refuses at once
    metadata: dict[str, Any] = {"pre_commands": ["true"]} if setup else {}
    request = attrs.evolve(request_for(settings, **metadata), docker_image=image)
    execution = Execution(execution_id=new_execution_id())
    pulling = DockerRunner(attrs.evolve(settings, docker_pull=True), client=docker_client)

    async def on_running(_: object) -> None:
        raise AssertionError("must not run")

    with pytest.raises(BackendError) as info:
        await pulling.start(execution, request, tar_chunks(b""), on_running)
    assert info.value.code == "image_unavailable"
    assert image in info.value.message
    assert leftovers(docker_client, execution.execution_id) == []
    await pulling.aclose()


@pytest.mark.docker
@pytest.mark.anyio
async def test_missing_image_is_not_pulled_when_pulling_is_off(
    runner: DockerRunner, settings: Settings
) -> None:
    """With docker_pull off, a missing image fails at once and no pull is attempted."""
    assert settings.docker_pull is False
    request = attrs.evolve(request_for(settings), docker_image="pyexec-missing:never")

    async def on_running(_: object) -> None:
        raise AssertionError("must not run")

    with pytest.raises(BackendError) as info:
        await runner.start(
            Execution(execution_id=new_execution_id()), request, tar_chunks(b""), on_running
        )
    assert info.value.code == "image_unavailable"
    assert "pulling is off" in info.value.message


@pytest.mark.docker
@pytest.mark.anyio
async def test_tar_that_fails_midway_fails_start_and_cleans_up(
    runner: DockerRunner, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """If the stored tar breaks off while it is sent, start raises the store's error."""
    execution = Execution(execution_id=new_execution_id())
    data = make_tar({"main.py": "print(1)", "big.bin": b"x" * 600_000})

    async def broken() -> AsyncIterator[bytes]:
        yield data[:300_000]
        raise NotFound("the tar is gone", code="tar_not_found")

    async def on_running(_: object) -> None:
        pass

    with pytest.raises(NotFound) as info:
        await runner.start(execution, request_for(settings), broken(), on_running)
    assert info.value.code == "tar_not_found"
    assert leftovers(docker_client, execution.execution_id) == []


@pytest.mark.docker
@pytest.mark.anyio
async def test_startup_sweeps_leftovers_of_dead_processes_only(
    runner: DockerRunner, docker_client: docker.DockerClient
) -> None:
    """startup removes managed containers of a gone process, also one whose pid this
    process reuses (a restarted container's PID 1), and spares those of a live one."""
    live = owner_label()
    earlier = f"{socket.gethostname()}:{os.getpid()}:1"  # same pid, started at another time
    made = {}
    for owner in ("elsewhere:1", earlier, live):
        execution_id = new_execution_id()
        docker_client.containers.create(
            TEST_IMAGE,
            ["true"],
            labels={LABEL_MANAGED: "1", LABEL_EXECUTION: execution_id, LABEL_OWNER: owner},
        )
        made[owner] = execution_id
    try:
        await runner.startup()
        assert leftovers(docker_client, made["elsewhere:1"]) == []
        assert leftovers(docker_client, made[earlier]) == []
        assert len(leftovers(docker_client, made[live])) == 1
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_EXECUTION}={made[live]}"}
        ):
            container.remove(force=True)


@pytest.mark.docker
@pytest.mark.anyio
async def test_startup_leaves_a_crashed_runs_container_for_adoption_then_sweeps_it(
    settings: Settings, docker_client: docker.DockerClient
) -> None:
    """A run container of a gone process survives startup (resume may adopt it); if
    nothing adopts it within the adoption window, it is swept."""
    execution_id = new_execution_id()
    docker_client.containers.create(
        TEST_IMAGE,
        ["true"],
        labels={
            LABEL_MANAGED: "1",
            LABEL_EXECUTION: execution_id,
            LABEL_OWNER: "elsewhere:1",
            LABEL_PHASE: "run",
        },
    )
    runner = DockerRunner(settings, docker_client, adoption_window=0.5)
    try:
        await runner.startup()
        assert len(leftovers(docker_client, execution_id)) == 1
        # A created-but-never-started container holds no outcome: nothing to adopt.
        execution = Execution(execution_id=execution_id, request=request_for(settings))
        assert not await runner.resume(execution)
        deadline = time.monotonic() + 20
        while leftovers(docker_client, execution_id):
            assert time.monotonic() < deadline, "the orphan was never swept"
            await anyio.sleep(0.1)  # bounded poll: the sweep runs in the background
    finally:
        await runner.aclose()
        await Engine(settings, docker_client).sweep({LABEL_EXECUTION: execution_id})


@pytest.mark.docker
@pytest.mark.anyio
async def test_ping(runner: DockerRunner, settings: Settings) -> None:
    """ping succeeds against the engine and says runner_unavailable without one."""
    await runner.ping()
    # A closed loopback port: refused at once (docker-py leaks the socket of a failed
    # unix-socket connect, so the missing engine is simulated over TCP).
    nowhere = DockerRunner(attrs.evolve(settings, docker_host="tcp://127.0.0.1:1"))
    try:
        with pytest.raises(BackendUnavailable) as info:
            await nowhere.ping()
        assert info.value.code == "runner_unavailable"
    finally:
        await nowhere.aclose()


@pytest.mark.docker
@pytest.mark.network
@pytest.mark.anyio
async def test_requirements_install_from_the_index(
    docker_client: docker.DockerClient, settings: Settings
) -> None:
    """requirements_txt is installed with the network (via the CA bundle); the run has none."""
    settings = attrs.evolve(settings, ca_bundle=CA_BUNDLE)
    runner = DockerRunner(settings, docker_client)
    code = "import os, six\nprint(six.__name__, os.listdir('/sys/class/net'))\n"
    try:
        outcome = await execute(
            runner,
            docker_client,
            settings,
            {"main.py": code},
            requirements_txt="six\n",
            config={"timeout_seconds": 120},
        )
    finally:
        await runner.aclose()
    assert outcome.reason is Reason.EXITED, (outcome.error, outcome.stderr[-2000:])
    assert outcome.stdout == "six ['lo']\n"


# --- Races and error paths (a real engine held at gates) -------------------------------------


@pytest.mark.docker
@pytest.mark.anyio
@pytest.mark.parametrize("gate", ["after_create", "after_create_volume"])
async def test_shutdown_while_creating_leaves_nothing(
    settings: Settings,
    gated_client: tuple[docker.DockerClient, GatedAPI],
    docker_client: docker.DockerClient,
    gate: str,
) -> None:
    """A container or volume the engine creates while the runner shuts down is removed too."""
    client, api = gated_client
    held = Gate()
    setattr(api, gate, held)
    runner = DockerRunner(settings, client)
    # A setup with its own network needs a volume; the plain run needs just a container.
    metadata: dict[str, Any] = {"pre_commands": ["true"]} if gate == "after_create_volume" else {}
    request = request_for(settings, **metadata)
    execution = Execution(execution_id=new_execution_id())

    async def on_running(_: object) -> None:
        pass

    async def launch() -> None:
        with pytest.raises(BackendUnavailable):
            await runner.start(execution, request, tar_chunks(make_tar(FILES)), on_running)

    async with anyio.create_task_group() as group:
        group.start_soon(launch)
        await held.wait_reached()
        group.start_soon(runner.aclose)
        await anyio.wait_all_tasks_blocked()
        held.release.set()
    assert leftovers(docker_client, execution.execution_id) == []


@pytest.mark.docker
@pytest.mark.anyio
async def test_kill_between_create_and_start_stops_the_run(
    settings: Settings,
    gated_client: tuple[docker.DockerClient, GatedAPI],
    docker_client: docker.DockerClient,
) -> None:
    """A kill that lands while the container is being started still ends the run at once."""
    client, api = gated_client
    api.before_start = Gate()
    runner = DockerRunner(settings, client)
    request = request_for(settings)
    started = Started(runner, new_execution_id())
    execution = Execution(execution_id=started.execution_id)
    tar = tar_chunks(make_tar({"main.py": "import time\ntime.sleep(60)\n"}))
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(runner.start, execution, request, tar, started.on_running)
            await api.before_start.wait_reached()
            before = time.monotonic()
            group.start_soon(runner.kill, started.execution_id)
            await anyio.wait_all_tasks_blocked()
            api.before_start.release.set()
        outcome = await started.wait(timeout=10)
        assert outcome.reason is Reason.KILLED, outcome
        assert time.monotonic() - before < 8
        assert leftovers(docker_client, started.execution_id) == []
    finally:
        await runner.aclose()


@pytest.mark.docker
@pytest.mark.anyio
async def test_a_failed_removal_keeps_the_outcome_and_a_later_kill_sweeps(
    settings: Settings,
    gated_client: tuple[docker.DockerClient, GatedAPI],
    docker_client: docker.DockerClient,
) -> None:
    """If the engine refuses to remove a finished container, wait still gives the outcome."""
    client, api = gated_client
    api.failing_removals = 3  # every attempt of the removal once the run is over
    runner = DockerRunner(settings, client)
    try:
        started = await start(runner, settings, {"main.py": "print('done')"})
        outcome = await started.wait(timeout=30)
        assert (outcome.reason, outcome.stdout) == (Reason.EXITED, "done\n")
        assert len(leftovers(docker_client, started.execution_id)) == 1
        await runner.kill(started.execution_id)
        assert leftovers(docker_client, started.execution_id) == []
    finally:
        await runner.aclose()


@pytest.mark.docker
@pytest.mark.anyio
async def test_a_long_wait_does_not_hold_the_engine_calls_of_others(
    settings: Settings, docker_client: docker.DockerClient
) -> None:
    """Waiting for a container that keeps running gives its thread back between slices."""
    engine = Engine(settings, docker_client, threads=1)
    # Owned by this live process, so that a runner starting meanwhile (another test
    # session on this engine) does not sweep it away as a crash's leftover.
    sleeper = docker_client.containers.run(
        TEST_IMAGE,
        ["sleep", "60"],
        detach=True,
        labels={LABEL_MANAGED: "1", LABEL_OWNER: owner_label()},
    )
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(engine.wait, sleeper.id, 20.0)
            await anyio.wait_all_tasks_blocked()
            before = time.monotonic()
            await engine.ping()
            assert time.monotonic() - before < 5
            group.cancel_scope.cancel()
    finally:
        sleeper.remove(force=True)


@pytest.mark.docker
@pytest.mark.anyio
async def test_a_slow_archive_does_not_hold_the_engine_calls_of_others(
    settings: Settings, docker_client: docker.DockerClient
) -> None:
    """While one run's tar trickles in, another run starts and finishes."""
    runner = DockerRunner(settings, engine=Engine(settings, docker_client, threads=1))
    go_on = anyio.Event()
    data = make_tar({"main.py": "print('slow')", "pad.bin": b"x" * 300_000})

    async def stalled() -> AsyncIterator[bytes]:
        yield data[:100_000]
        await go_on.wait()
        yield data[100_000:]

    async def on_running(_: object) -> None:
        pass

    slow = Execution(execution_id=new_execution_id())
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(runner.start, slow, request_for(settings), stalled(), on_running)
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(15):
                other = await execute(runner, docker_client, settings, {"main.py": "print(1)"})
            assert other.stdout == "1\n"
            go_on.set()
        assert (await runner.wait(slow.execution_id, 30)).stdout == "slow\n"
    finally:
        go_on.set()
        await runner.aclose()


@pytest.mark.docker
@pytest.mark.anyio
async def test_the_outcome_does_not_wait_for_the_container_removal(
    settings: Settings,
    gated_client: tuple[docker.DockerClient, GatedAPI],
    docker_client: docker.DockerClient,
) -> None:
    """The outcome is handed over while the engine still removes the run's container,
    which is gone once the removal is let through."""
    client, api = gated_client
    api.before_remove = Gate()
    runner = DockerRunner(settings, client)
    try:
        started = await start(runner, settings, {"main.py": "print('done')"})
        outcome = await runner.wait(started.execution_id, 60)
        assert (outcome.reason, outcome.stdout) == (Reason.EXITED, "done\n")
        await api.before_remove.wait_reached()
        assert len(leftovers(docker_client, started.execution_id)) == 1
        api.before_remove.release.set()
        await runner.removed(started.execution_id)
        assert leftovers(docker_client, started.execution_id) == []
    finally:
        api.before_remove.release.set()
        await runner.aclose()


@pytest.mark.docker
@pytest.mark.anyio
async def test_shutdown_waits_for_removals_under_way(
    settings: Settings,
    gated_client: tuple[docker.DockerClient, GatedAPI],
    docker_client: docker.DockerClient,
) -> None:
    """Shutdown returns only once the containers of finished runs are removed."""
    client, api = gated_client
    api.before_remove = Gate()
    runner = DockerRunner(settings, client)
    try:
        started = await start(runner, settings, {"main.py": "print('done')"})
        await runner.wait(started.execution_id, 60)
        await api.before_remove.wait_reached()
        async with anyio.create_task_group() as group:
            group.start_soon(runner.aclose)
            await anyio.wait_all_tasks_blocked()
            assert len(leftovers(docker_client, started.execution_id)) == 1
            api.before_remove.release.set()
    finally:
        api.before_remove.release.set()
        await runner.aclose()
    assert leftovers(docker_client, started.execution_id) == []


@pytest.mark.docker
@pytest.mark.anyio
async def test_a_new_run_waits_while_too_many_removals_are_under_way(
    settings: Settings,
    gated_client: tuple[docker.DockerClient, GatedAPI],
    docker_client: docker.DockerClient,
) -> None:
    """Containers of finished runs never pile up: past ``pending_removals`` removals under
    way, a launch waits for one to end."""
    client, api = gated_client
    api.before_remove = Gate()
    runner = DockerRunner(settings, client, pending_removals=1)
    try:
        first = await start(runner, settings, {"main.py": "print('first')"})
        await runner.wait(first.execution_id, 60)
        await api.before_remove.wait_reached()
        launched: list[Started] = []

        async def launch() -> None:
            launched.append(await start(runner, settings, {"main.py": "print('second')"}))

        async with anyio.create_task_group() as group:
            group.start_soon(launch)
            await anyio.wait_all_tasks_blocked()
            assert launched == []
            assert len(leftovers(docker_client, first.execution_id)) == 1
            api.before_remove.release.set()
        assert leftovers(docker_client, first.execution_id) == []
        assert (await launched[0].wait()).stdout == "second\n"
    finally:
        api.before_remove.release.set()
        await runner.aclose()
