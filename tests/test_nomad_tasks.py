"""The runner job's task modules, run on the host as the tasks run them (no Nomad, no Docker).

``nomad_run.py`` is started the way the run task starts it (``python3 -I -S``, with
``tarcheck.py`` beside it) against a task dir holding what the Nomad client renders;
``nomad_finish.py``'s record building is called directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from pyexec.models import Reason
from pyexec.runner import nomad_job
from pyexec.settings import Settings
from pyexec.taskscripts import nomad_finish

from .tarfiles import make_tar, symlink_tar

ROOT = Path(__file__).resolve().parent.parent


def escaping_tar() -> bytes:
    """A symlink out of the tree, then a file written through it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo("out")
        link.type = tarfile.SYMTYPE
        link.linkname = "../../etc"
        tar.addfile(link)
    return buf.getvalue()


def run_task(
    tmp_path: Path,
    tar: bytes,
    request: dict[str, Any] | None = None,
    *,
    status: str = "pending",
    manifest: dict[str, Any] | None = None,
    phase: str | None = None,
    work_dir: str = "work",
    extra_env: dict[str, str] | None = None,
) -> tuple[dict[str, Any], bytes, bytes]:
    """Run the run task's code on the host; its verdict, stdout and stderr files.

    ``phase``: ``PYEXEC_PHASE`` (then the verdict is ``{}`` for the setup phase, which
    writes none); ``work_dir``: the task's own /work (each task has its tmpfs)."""
    local, alloc, work = tmp_path / "local", tmp_path / "alloc", tmp_path / work_dir
    for path in (local / "pyexec", alloc / "data", work):
        path.mkdir(parents=True, exist_ok=True)
    for dest in (
        "local/pyexec/nomad_run.py",
        "local/pyexec/tarcheck.py",
        "local/pyexec/collect.py",
    ):
        (tmp_path / dest).write_text(nomad_job.task_file(dest))
    (local / "bundle.tar").write_bytes(tar)
    if manifest is None:
        manifest = {"size": len(tar), "sha256": hashlib.sha256(tar).hexdigest()}
    (local / "manifest.json").write_text(json.dumps(manifest))
    base = {"entrypoint": "main.py", "config": {"timeout_seconds": 20, "max_output_bytes": 100}}
    record = {"status": status, "request": {**base, **(request or {})}}
    (local / "record.json").write_text(json.dumps(record))
    env = {
        "PATH": os.environ["PATH"],
        "NOMAD_TASK_DIR": str(local),
        "NOMAD_ALLOC_DIR": str(alloc),
        "PYEXEC_WORK_DIR": str(work),
        **({"PYEXEC_PHASE": phase} if phase else {}),
        **(extra_env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(local / "pyexec" / "nomad_run.py")],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = alloc / "data" / "pyexec"
    if phase == "setup":
        return {}, b"", b""
    verdict = json.loads((out / "verdict.json").read_text())
    return verdict, (out / "stdout").read_bytes(), (out / "stderr").read_bytes()


def run_phases(
    tmp_path: Path, tar: bytes, request: dict[str, Any]
) -> tuple[dict[str, Any], bytes, bytes]:
    """The setup task, then the run task in its own /work, as a ``-setup`` job runs them."""
    run_task(tmp_path, tar, request, phase="setup", work_dir="setup-work")
    assert not (tmp_path / "alloc" / "data" / "pyexec" / "verdict.json").exists()
    return run_task(tmp_path, tar, request, phase="run", work_dir="work")


def test_an_in_tree_symlink_unpacks_and_runs(tmp_path: Path) -> None:
    """A tar with an in-tree symlink passes the tar rules and runs (as on Docker)."""
    verdict, stdout, _ = run_task(tmp_path, symlink_tar())
    assert (verdict["reason"], verdict["exit_code"]) == ("exited", 0)
    assert stdout == b"through the link\n"
    assert os.readlink(tmp_path / "work" / "lib") == "pkg"


def test_a_symlink_out_of_the_tree_is_refused_by_the_api_rules(tmp_path: Path) -> None:
    """The run task applies the API's tar rules: a link leaving the tree is setup_failed."""
    verdict, _, _ = run_task(tmp_path, escaping_tar())
    assert verdict["reason"] == "setup_failed"
    assert "symlink 'out'" in verdict["error"]
    assert not (tmp_path / "work" / "out").exists()


def test_a_tar_that_does_not_match_its_manifest_is_refused(tmp_path: Path) -> None:
    """The tar's sha256 is checked against the manifest before anything is unpacked."""
    tar = make_tar({"main.py": "print('x')"})
    verdict, _, _ = run_task(tmp_path, tar, manifest={"size": len(tar), "sha256": "0" * 64})
    assert verdict["reason"] == "setup_failed"
    assert "does not match its manifest" in verdict["error"]
    assert list((tmp_path / "work").iterdir()) == []


def test_output_is_capped_exactly_and_the_run_ends_with_output_limit(tmp_path: Path) -> None:
    """max_output_bytes of stdout are kept, not one more, and the verdict is output_limit."""
    code = "import sys\nfor _ in range(100):\n    sys.stdout.write('y' * 1000)\n"
    verdict, stdout, _ = run_task(tmp_path, make_tar({"main.py": code}))
    assert verdict["reason"] == "output_limit"
    assert verdict["output_truncated"] is True
    assert stdout == b"y" * 100


def test_a_failing_pre_command_is_setup_failed_with_its_output(tmp_path: Path) -> None:
    """A pre-command's failure names its exit code; its output is the stderr left."""
    verdict, stdout, stderr = run_task(
        tmp_path, make_tar({"main.py": "print(1)"}), {"pre_commands": ["echo prep; exit 3"]}
    )
    assert verdict["reason"] == "setup_failed"
    assert "exit code 3" in verdict["error"]
    assert (stdout, stderr) == (b"", b"prep\n")


def test_a_terminal_record_runs_nothing(tmp_path: Path) -> None:
    """A plain dispatch of an execution that is over already runs nothing."""
    tar = make_tar({"main.py": "open('ran', 'w').write('yes')"})
    verdict, _, _ = run_task(tmp_path, tar, status="killed")
    assert verdict["reason"] == "skipped"
    assert not (tmp_path / "work" / "ran").exists()


def test_timeout_is_enforced_in_the_task(tmp_path: Path) -> None:
    """A program past its timeout is killed by the task and reported as timeout."""
    code = "import time\nprint('before', flush=True)\ntime.sleep(30)\n"
    verdict, stdout, _ = run_task(
        tmp_path, make_tar({"main.py": code}), {"config": {"timeout_seconds": 1}}
    )
    assert verdict["reason"] == "timeout"
    assert stdout == b"before\n"


def test_pre_commands_in_the_setup_task_hand_work_to_the_run_task(tmp_path: Path) -> None:
    """Phase setup runs the pre-commands and never the program; phase run unpacks what
    they left (links in the tree included) into its own /work and runs the program there."""
    code = "import os\nprint(open('made.txt').read().strip(), os.readlink('link'))\n"
    pre = ["echo prepared > made.txt && ln -s made.txt link && mkdir -p d/e && touch d/e/f"]
    tar = make_tar({"main.py": code})
    verdict, stdout, _ = run_phases(tmp_path, tar, {"pre_commands": pre})
    assert (verdict["reason"], verdict["exit_code"]) == ("exited", 0)
    assert stdout == b"prepared made.txt\n"
    assert (tmp_path / "work" / "d" / "e" / "f").exists()
    assert not (tmp_path / "setup-work" / "__pycache__").exists()  # main.py never ran there


def test_a_failing_pre_command_in_the_setup_task_is_setup_failed_with_its_output(
    tmp_path: Path,
) -> None:
    """The setup task's failure reaches the run task's verdict; the program never runs."""
    tar = make_tar({"main.py": "open('ran', 'w').write('yes')"})
    verdict, stdout, stderr = run_phases(tmp_path, tar, {"pre_commands": ["echo prep; exit 3"]})
    assert verdict["reason"] == "setup_failed"
    assert "exit code 3" in verdict["error"]
    assert (stdout, stderr) == (b"", b"prep\n")
    assert not (tmp_path / "work" / "ran").exists()


def test_the_setup_task_waits_for_the_installer_and_stops_at_its_failure(
    tmp_path: Path,
) -> None:
    """In a -pip-setup job the setup task waits for install.json (its prestart sibling)
    and runs no pre-command when the install failed; the run task reports the installer's
    error."""
    out = tmp_path / "alloc" / "data" / "pyexec"
    out.mkdir(parents=True)
    (out / "install.json").write_text(json.dumps({"ok": False, "error": "no wheel: x"}))
    tar = make_tar({"main.py": "print(1)"})
    request = {"pre_commands": ["touch ran"]}
    run_task(
        tmp_path, tar, request, phase="setup", work_dir="sw", extra_env={"PYEXEC_WAIT_INSTALL": "1"}
    )
    assert not (tmp_path / "sw" / "ran").exists()
    verdict, _, _ = run_task(tmp_path, tar, request, phase="run")
    assert (verdict["reason"], verdict["error"]) == ("setup_failed", "no wheel: x")


def test_what_the_pre_commands_leave_passes_the_tar_rules(tmp_path: Path) -> None:
    """A link out of /work left by a pre-command is refused by the run task's tar rules,
    so the program never sees it."""
    tar = make_tar({"main.py": "print(1)"})
    verdict, _, _ = run_phases(tmp_path, tar, {"pre_commands": ["ln -s /etc out"]})
    assert verdict["reason"] == "setup_failed"
    assert "what the pre-commands left in /work was refused" in verdict["error"]
    assert not (tmp_path / "work" / "out").exists()


def test_a_run_task_without_the_setup_tasks_result_is_setup_failed(tmp_path: Path) -> None:
    """Phase run never runs the program on a /work it was not handed."""
    tar = make_tar({"main.py": "print(1)"})
    verdict, _, _ = run_task(tmp_path, tar, {"pre_commands": ["true"]}, phase="run")
    assert (verdict["reason"], verdict["error"]) == (
        "setup_failed",
        "the setup task left no result",
    )


def writer_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in nomad_job.writer_env(Settings(consul_prefix="p")).items():
        monkeypatch.setenv(name, value.replace("${NOMAD_META_execution_id}", "exe_1"))


@pytest.mark.parametrize("reason", list(Reason))
def test_the_writer_maps_each_reason_to_the_services_status(
    reason: Reason, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finish task's final record has the status the service gives each reason."""
    writer_env(monkeypatch)
    final, chunks = nomad_finish.final_record(
        {"status": "pending", "execution_id": "exe_1"},
        {"reason": reason.value, "exit_code": 0},
        {"stdout": b"ok", "stderr": b""},
        "r1",
    )
    assert (final["status"], final["reason"], final["stdout"], chunks) == (
        reason.status.value,
        reason.value,
        "ok",
        [],
    )


def test_the_writer_chunks_large_output_as_the_store_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Output above the inline threshold goes to output/<rev>/ chunks beside the record."""
    from pyexec.store import CHUNK_SIZE, consul_keys

    writer_env(monkeypatch)
    big = b"z" * (CHUNK_SIZE + 10)
    final, chunks = nomad_finish.final_record(
        {"status": "pending"}, {"reason": "exited"}, {"stdout": big, "stderr": b"e"}, "r1"
    )
    assert final["stdout"] == ""
    assert final["output"] == {"rev": "r1", "stdout": {"chunks": 2, "size": len(big)}}
    assert [key for key, _ in chunks] == [
        consul_keys.output_chunk_key("p", "exe_1", "r1", "stdout", i) for i in range(2)
    ]


def test_an_unknown_reason_from_the_sandbox_is_stored_as_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A verdict the program forged with a reason pyexec does not know becomes an error."""
    writer_env(monkeypatch)
    final, _ = nomad_finish.final_record(
        {"status": "pending"}, {"reason": "sideways", "exit_code": True}, {}, "r1"
    )
    assert (final["status"], final["reason"], final["exit_code"]) == ("failed", "error", None)


def test_a_plain_dispatch_without_stored_artifacts_says_they_were_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request that asked for artifacts whose run task left none (or none the finish
    task could store) gets an empty list, flagged truncated."""
    writer_env(monkeypatch)
    request = {"artifacts": ["*.png"]}
    final, _ = nomad_finish.final_record(
        {"status": "running", "request": request}, {"reason": "exited"}, {}, "r1"
    )
    assert (final["artifacts"], final["artifacts_truncated"]) == ([], True)
    plain, _ = nomad_finish.final_record({"status": "running"}, {"reason": "exited"}, {}, "r1")
    assert "artifacts" not in plain
