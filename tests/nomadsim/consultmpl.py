"""The few consul-template actions the double renders, with the client's own Consul access.

Nomad's client renders a task's templates with consul-template (github.com/hashicorp/
consul-template, ``template/funcs.go``) before the task starts. The double knows only
what pyexec's runner job uses, and refuses anything else loudly:

- ``{{ range ls PATH }}{{ .Value }}{{ end }}``: the values of the keys directly under
  ``PATH`` (not deeper), in key order (``lsFunc``: a recursive KV list, keys with a
  ``/`` after the prefix dropped); nothing when there are none (it does not block);
- ``{{ keyOrDefault PATH "DEFAULT" }}``: the value, or the default when the key does
  not exist (does not block);
- PATH as a string, ``(env "NAME")`` (the task's environment, meta included) or
  ``(printf "FORMAT" ARG...)`` with ``%s``.

Values are written byte for byte (checked on Nomad 1.6.5: a 300,000-byte binary value
in two 256 KiB chunks rendered with an equal sha256).

Re-rendering (``watch``): like the real client, a template is rendered again when the
keys it read change, and the file rewritten (atomically) when its text changed; with
``change_mode = "noop"`` the running task just sees the new file. Checked on Nomad
1.6.5: a task whose ``keyOrDefault`` and ``range ls`` templates rendered empty at start
saw both files rewritten by one transaction writing the key and two 256 KiB chunks,
within 50-220 ms. Simplified: consul-template keeps one blocking query per dependency;
the double keeps one, on the longest common prefix of the keys the template read
(so it may re-render more often, never less).
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

__all__ = ["TemplateError", "render", "watch"]

_ACTION = re.compile(rb"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()"]+)')


class TemplateError(Exception):
    """A template the double cannot render (an action it does not know)."""


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            if text[pos:].strip():
                raise TemplateError(f"cannot parse {text!r}")
            break
        out.append(match.group(1))
        pos = match.end()
    return out


class _Renderer:
    def __init__(self, consul: httpx.Client, env: dict[str, str]) -> None:
        self.consul = consul
        self.env = env
        #: The Consul keys and prefixes this render read.
        self.deps: list[str] = []

    def expr(self, tokens: list[str]) -> Any:
        """Evaluate a pipeline-free expression (consumes ``tokens``)."""
        token = tokens.pop(0)
        if token.startswith('"'):
            return json.loads(token)
        if token == "(":
            value = self.call(tokens)
            if not tokens or tokens.pop(0) != ")":
                raise TemplateError("unbalanced parentheses")
            return value
        raise TemplateError(f"unsupported operand {token!r}")

    def call(self, tokens: list[str]) -> Any:
        name = tokens.pop(0)
        args = []
        while tokens and tokens[0] != ")":
            args.append(self.expr(tokens))
        if name == "env" and len(args) == 1:
            return self.env.get(str(args[0]), "")
        if name == "printf" and args:
            return str(args[0]) % tuple(args[1:])  # %s and %% mean what they mean in Go
        if name == "keyOrDefault" and len(args) == 2:
            value = self.get(str(args[0]))
            return args[1].encode() if value is None else value
        if name == "ls" and len(args) == 1:
            return self.ls(str(args[0]))
        raise TemplateError(f"unsupported function {name!r}")

    def get(self, key: str) -> bytes | None:
        self.deps.append(key)
        answer = self.consul.get(f"/v1/kv/{key}")
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        return base64.b64decode(answer.json()[0].get("Value") or "")

    def ls(self, prefix: str) -> list[dict[str, bytes]]:
        folder = prefix.rstrip("/") + "/"
        self.deps.append(folder)
        answer = self.consul.get(f"/v1/kv/{folder}", params={"recurse": "true"})
        if answer.status_code == 404:
            return []
        answer.raise_for_status()
        rows = [
            {"Key": e["Key"][len(folder) :], "Value": base64.b64decode(e.get("Value") or "")}
            for e in answer.json()
            if e["Key"] != folder and "/" not in e["Key"][len(folder) :]
        ]
        return sorted(rows, key=lambda r: r["Key"])


def _url(consul_addr: str) -> str:
    return consul_addr if "://" in consul_addr else f"http://{consul_addr}"


def render(template: bytes, consul_addr: str, env: dict[str, str]) -> bytes:
    """Render ``template`` (bytes, default delimiters) against Consul at ``consul_addr``."""
    with httpx.Client(base_url=_url(consul_addr), timeout=30) as consul:
        return _render(_Renderer(consul, env), template)


def _common_prefix(keys: list[str]) -> str:
    # KV prefixes are string prefixes, not path components.
    return os.path.commonprefix(keys) if keys else ""  # noqa: RUF071


def watch(
    template: bytes,
    consul_addr: str,
    env: dict[str, str],
    write: Callable[[bytes], None],
    stop: threading.Event,
    first: bytes,
    wait_s: float = 1.0,
) -> None:
    """Until ``stop``: render ``template`` again whenever a key it read changes, and
    ``write`` the result when it differs from the last one (``first``: the render the
    task started with; run in a thread)."""
    last = first
    index = 0
    with httpx.Client(base_url=_url(consul_addr), timeout=30 + wait_s) as consul:
        while not stop.is_set():
            renderer = _Renderer(consul, env)
            try:
                data = _render(renderer, template)
            except (TemplateError, httpx.HTTPError):
                stop.wait(wait_s)
                continue
            if data != last:
                write(data)
            last = data
            params: dict[str, Any] = {"recurse": "true", "wait": f"{wait_s}s"}
            if index:
                params["index"] = index
            try:
                answer = consul.get(f"/v1/kv/{_common_prefix(renderer.deps)}", params=params)
            except httpx.HTTPError:
                stop.wait(wait_s)
                continue
            new = int(answer.headers.get("X-Consul-Index") or 0)
            index = 0 if new < index else new  # an index that went back: start over


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` by a rename, as consul-template does (a reader never sees half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


def _render(renderer: _Renderer, template: bytes) -> bytes:
    out = bytearray()
    pos = 0
    loop: list[dict[str, bytes]] | None = None
    body_start = 0
    for match in _ACTION.finditer(template):
        literal = template[pos : match.start()]
        pos = match.end()
        action = match.group(1).decode()
        tokens = _tokens(action)
        if loop is not None:
            if tokens == ["end"]:
                body = template[body_start : match.start()]
                for item in loop:
                    out += _render_body(body, item)
                loop = None
            continue
        out += literal
        if tokens[:2] == ["range", "ls"]:
            loop = renderer.ls(str(renderer.expr(tokens[2:])))
            body_start = pos
        else:
            value = renderer.call(tokens)
            out += value if isinstance(value, bytes) else str(value).encode()
    if loop is not None:
        raise TemplateError("range without end")
    out += template[pos:]
    return bytes(out)


def _render_body(body: bytes, item: dict[str, bytes]) -> bytes:
    """The body of ``range ls``: literal text and ``.Value``/``.Key`` only."""
    out = bytearray()
    pos = 0
    for match in _ACTION.finditer(body):
        out += body[pos : match.start()]
        pos = match.end()
        field = match.group(1).decode().strip()
        if field not in (".Value", ".Key"):
            raise TemplateError(f"unsupported action in range: {field!r}")
        value = item[field[1:]]
        out += value if isinstance(value, bytes) else str(value).encode()
    return bytes(out + body[pos:])
