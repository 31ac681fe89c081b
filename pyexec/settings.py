"""Service configuration: one frozen object, read once from the environment at the edge.

Each field names the environment variable(s) it is read from, in order of
precedence, and a one-line description; ``docs/configuration.md`` is generated
from these (``pyexec config-reference``) and a test keeps the two in step.
Library code receives a ``Settings``; it never reads ``os.environ`` itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs

from .errors import BadRequest
from .imageref import is_valid_reference

__all__ = [
    "CONFIG_MINIMA",
    "LOOPBACK_HOSTS",
    "ResourceClass",
    "Settings",
    "SettingsError",
    "env_names",
]

MiB = 1024 * 1024

#: The smallest value of each request limit (``config.*``) a request or a default may set.
CONFIG_MINIMA = {
    "timeout_seconds": 1,
    "memory_mb": 16,
    "disk_mb": 1,
    "cpu_shares": 2,
    "pids_limit": 8,
    "max_output_bytes": 1,
    "max_artifact_bytes": 0,
}
#: ``config.*`` name → (the default's field, the maximum's field) in ``Settings``.
CONFIG_FIELDS = {
    "timeout_seconds": ("default_timeout", "max_timeout"),
    "memory_mb": ("default_memory_mb", "max_memory_mb"),
    "disk_mb": ("default_disk_mb", "max_disk_mb"),
    "cpu_shares": ("default_cpu_shares", "max_cpu_shares"),
    "pids_limit": ("default_pids_limit", "max_pids_limit"),
    "max_output_bytes": ("default_max_output_bytes", "max_output_bytes"),
    "max_artifact_bytes": ("default_max_artifact_bytes", "max_artifact_bytes"),
}
#: Host names ``pyexec serve`` may bind without API tokens.
LOOPBACK_HOSTS = frozenset({"localhost", "::1"})
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(BadRequest):
    """The environment holds a value that cannot be parsed."""

    default_code = "invalid_setting"


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean, got {raw!r}")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _mapping(raw: str) -> tuple[tuple[str, str], ...]:
    """``3.11=python:3.11-slim,3.12=python:3.12-slim`` as ordered pairs."""
    pairs = []
    for item in _list(raw):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _optional_str(raw: str) -> str | None:
    return raw or None


def _requirement_sets(raw: str) -> tuple[tuple[str, ...], ...]:
    """``numpy;pandas;numpy pandas`` as requirement sets (each checked by ``pyexec.deps``)."""
    from .deps.key import NotCacheable, normalise_requirements

    sets = []
    for part in raw.split(";"):
        if not part.strip():
            continue
        try:
            sets.append(normalise_requirements("\n".join(part.split())))
        except NotCacheable as exc:
            raise ValueError(str(exc)) from None
    return tuple(dict.fromkeys(sets))


def _runtime(raw: str) -> str:
    """A runtime name as dockerd registers it (``runc``, ``runsc``, ``io.containerd.runc.v2``)."""
    name = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ValueError(f"expected a runtime name such as runc or runsc, got {raw!r}")
    return name


@attrs.frozen
class ResourceClass:
    """A registered runner job size (Nomad cannot interpolate resources per dispatch)."""

    name: str
    cpu_mhz: int
    memory_mb: int
    disk_mb: int


def _resource_classes(raw: str) -> tuple[ResourceClass, ...]:
    """``small:500:512:1024,medium:1000:2048:4096`` (name:cpu_mhz:memory_mb:disk_mb)."""
    classes = []
    for item in _list(raw):
        parts = item.split(":")
        if len(parts) != 4:
            raise ValueError(f"expected name:cpu_mhz:memory_mb:disk_mb, got {item!r}")
        classes.append(ResourceClass(parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
    return tuple(sorted(classes, key=lambda c: (c.memory_mb, c.disk_mb, c.cpu_mhz)))


def setting(
    default: Any,
    *env: str,
    help: str,
    parse: Callable[[str], Any] = str,
) -> Any:
    return attrs.field(default=default, metadata={"env": env, "help": help, "parse": parse})


def env_names(field: attrs.Attribute[Any]) -> tuple[str, ...]:
    names: tuple[str, ...] = field.metadata.get("env", ())
    return names


@attrs.frozen(kw_only=True)
class Settings:
    # --- HTTP service ---------------------------------------------------------------
    host: str = setting(
        "127.0.0.1",
        "PYEXEC_HOST",
        help="Address `pyexec serve` binds to. Any address but loopback needs API tokens, "
        "or PYEXEC_ALLOW_UNAUTHENTICATED.",
    )
    port: int = setting(8080, "PYEXEC_PORT", parse=int, help="Port `pyexec serve` listens on.")
    allow_unauthenticated: bool = setting(
        False,
        "PYEXEC_ALLOW_UNAUTHENTICATED",
        parse=_bool,
        help="Serve on a non-loopback address without API tokens (anyone who reaches the "
        "port can run code); logged as a warning at every start.",
    )
    api_tokens: tuple[str, ...] = setting(
        (),
        "PYEXEC_API_TOKENS",
        parse=_list,
        help="Comma-separated bearer tokens; when set (or a token file), every endpoint but "
        "/health requires one.",
    )
    api_token_file: str | None = setting(
        None,
        "PYEXEC_API_TOKEN_FILE",
        parse=_optional_str,
        help="File with one bearer token per line (blank lines and # comments ignored).",
    )
    shutdown_grace_seconds: float = setting(
        30.0,
        "PYEXEC_SHUTDOWN_GRACE_SECONDS",
        parse=float,
        help="How long a shutdown lets in-flight sync requests finish.",
    )
    max_in_flight: int = setting(
        100,
        "PYEXEC_MAX_IN_FLIGHT",
        parse=int,
        help="Most executions one replica drives at once; more are refused with 429 "
        "(0: no cap). Each local run holds memory, a /work tmpfs and its output.",
    )
    launch_grace_seconds: float = setting(
        120.0,
        "PYEXEC_LAUNCH_GRACE_SECONDS",
        parse=float,
        help="A restarting service leaves a pending execution this young alone (another "
        "replica may be launching it, or an operator dispatching it) and checks it again later.",
    )
    log_format: str = setting("json", "PYEXEC_LOG_FORMAT", help="`json` or `text`.")
    log_level: str = setting(
        "INFO",
        "PYEXEC_LOG_LEVEL",
        help="Python logging level name (`DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL`).",
    )

    # --- Request defaults -----------------------------------------------------------
    default_timeout: int = setting(
        300, "PYEXEC_DEFAULT_TIMEOUT", parse=int, help="Seconds a run may take by default."
    )
    default_memory_mb: int = setting(
        1024, "PYEXEC_DEFAULT_MEMORY_MB", parse=int, help="Memory limit (MiB) by default."
    )
    default_disk_mb: int = setting(
        2048, "PYEXEC_DEFAULT_DISK_MB", parse=int, help="Size (MiB) of the /work tmpfs by default."
    )
    default_cpu_shares: int = setting(
        1024, "PYEXEC_DEFAULT_CPU_SHARES", parse=int, help="Relative CPU weight by default."
    )
    default_pids_limit: int = setting(
        256, "PYEXEC_DEFAULT_PIDS_LIMIT", parse=int, help="Process/thread cap by default."
    )
    default_max_output_bytes: int = setting(
        1 * MiB,
        "PYEXEC_DEFAULT_MAX_OUTPUT_BYTES",
        parse=int,
        help="Bytes of stdout and of stderr kept by default; more ends the run (output_limit).",
    )
    default_image: str = setting(
        "python:3.12-slim", "PYEXEC_DEFAULT_IMAGE", help="Container image for runs by default."
    )
    default_max_artifact_bytes: int = setting(
        16 * MiB,
        "PYEXEC_DEFAULT_MAX_ARTIFACT_BYTES",
        parse=int,
        help="Bytes of artifacts (output files) collected in total by default "
        "(`config.max_artifact_bytes`); past it, `artifacts_truncated`.",
    )

    # --- Server-side maxima a request may not exceed --------------------------------
    max_timeout: int = setting(3600, "PYEXEC_MAX_TIMEOUT", parse=int, help="Largest timeout.")
    max_memory_mb: int = setting(
        8192, "PYEXEC_MAX_MEMORY_MB", parse=int, help="Largest memory limit (MiB)."
    )
    max_disk_mb: int = setting(
        10240, "PYEXEC_MAX_DISK_MB", parse=int, help="Largest /work size (MiB)."
    )
    max_cpu_shares: int = setting(
        8192, "PYEXEC_MAX_CPU_SHARES", parse=int, help="Largest CPU weight."
    )
    max_pids_limit: int = setting(
        4096, "PYEXEC_MAX_PIDS_LIMIT", parse=int, help="Largest pids cap."
    )
    max_output_bytes: int = setting(
        64 * MiB, "PYEXEC_MAX_OUTPUT_BYTES", parse=int, help="Largest per-stream output cap."
    )
    allowed_images: tuple[str, ...] = setting(
        (),
        "PYEXEC_ALLOWED_IMAGES",
        parse=_list,
        help="Images a request may name besides the defaults (PYEXEC_DEFAULT_IMAGE and "
        "PYEXEC_PYTHON_IMAGES, always allowed); `*` allows any image.",
    )
    allow_network: bool = setting(
        False,
        "PYEXEC_ALLOW_NETWORK",
        parse=_bool,
        help="Whether a request may turn the network on for its run phase "
        "(`network_disabled: false`); refused with 400 `network_not_allowed` when off.",
    )
    setup_network: bool = setting(
        False,
        "PYEXEC_SETUP_NETWORK",
        parse=_bool,
        help="Whether the setup phase (requirements, pre_commands) gets the network; when off, "
        "a request with requirements_txt is refused with 400 `setup_network_unavailable`.",
    )
    ca_bundle: str | None = setting(
        None,
        "PYEXEC_CA_BUNDLE",
        parse=_optional_str,
        help="Host CA bundle mounted into setup containers, with SSL_CERT_FILE/PIP_CERT set "
        "(for TLS-intercepting proxies). Off by default.",
    )
    max_artifact_bytes: int = setting(
        256 * MiB,
        "PYEXEC_MAX_ARTIFACT_BYTES",
        parse=int,
        help="Largest `config.max_artifact_bytes` a request may ask for.",
    )

    # --- Uploaded archives ------------------------------------------------------------
    max_tar_bytes: int = setting(
        256 * MiB,
        "PYEXEC_MAX_TAR_BYTES",
        parse=int,
        help="Largest uploaded tar: reading stops at the first byte past it (413), so one "
        "request spools at most this much (plus, on the local runner, one copy until launch).",
    )
    max_tar_entries: int = setting(
        10_000, "PYEXEC_MAX_TAR_ENTRIES", parse=int, help="Most entries an uploaded tar may hold."
    )
    max_extracted_bytes: int = setting(
        1024 * MiB,
        "PYEXEC_MAX_EXTRACTED_BYTES",
        parse=int,
        help="Most bytes an uploaded tar may declare in its members.",
    )
    cleanup_ttl: int = setting(
        300,
        "PYEXEC_CLEANUP_TTL",
        parse=int,
        help="Seconds a finished execution (and its tar) is kept before the janitor deletes it.",
    )

    # --- Completion callbacks -----------------------------------------------------------
    callback_allowed_hosts: tuple[str, ...] = setting(
        (),
        "PYEXEC_CALLBACK_ALLOWED_HOSTS",
        parse=_list,
        help="Hosts (`host` or `host:port`, comma-separated) a request's `callback_url` may "
        "name; none by default, so pyexec calls nothing out.",
    )
    callback_secret: str | None = setting(
        None,
        "PYEXEC_CALLBACK_SECRET",
        parse=_optional_str,
        help="Key of the callbacks' HMAC-SHA256 signature (`X-Pyexec-Signature`); callbacks "
        "are refused while it is unset.",
    )
    callback_max_seconds: float = setting(
        300.0,
        "PYEXEC_CALLBACK_MAX_SECONDS",
        parse=float,
        help="How long a callback is retried (with backoff) before it is given up.",
    )

    # --- Live output (GET /api/v1/executions/{id}/events) -------------------------------
    output_flush_seconds: float = setting(
        0.25,
        "PYEXEC_OUTPUT_FLUSH_SECONDS",
        parse=float,
        help="How often the replica that drives a run writes its new output to the store, "
        "where other replicas stream it from (0.05 to 10; also as soon as 64 KiB wait).",
    )
    max_event_subscribers: int = setting(
        64,
        "PYEXEC_MAX_EVENT_SUBSCRIBERS",
        parse=int,
        help="Most event streams one replica serves for one execution; more are refused "
        "with 429 `too_many_subscribers`.",
    )

    # --- Eval API -----------------------------------------------------------------------
    python_images: tuple[tuple[str, str], ...] = setting(
        (
            ("3.10", "python:3.10-slim"),
            ("3.11", "python:3.11-slim"),
            ("3.12", "python:3.12-slim"),
            ("3.13", "python:3.13-slim"),
        ),
        "PYEXEC_PYTHON_IMAGES",
        parse=_mapping,
        help="Eval's python_version → image, as `3.12=python:3.12-slim,...`.",
    )
    default_python_version: str = setting(
        "3.12", "PYEXEC_DEFAULT_PYTHON_VERSION", help="Eval's python_version by default."
    )
    eval_auto_requirements: bool = setting(
        True,
        "PYEXEC_EVAL_AUTO_REQUIREMENTS",
        parse=_bool,
        help="Whether eval installs detected third-party imports by default.",
    )
    max_eval_code_bytes: int = setting(
        100_000, "PYEXEC_MAX_EVAL_CODE_BYTES", parse=int, help="Largest eval code/files total."
    )

    # --- Docker (embedded runner) ----------------------------------------------------
    docker_host: str | None = setting(
        None,
        "PYEXEC_DOCKER_HOST",
        "DOCKER_HOST",
        parse=_optional_str,
        help="Docker engine address; the SDK's default socket when unset.",
    )
    docker_pull: bool = setting(
        True,
        "PYEXEC_DOCKER_PULL",
        parse=_bool,
        help="Whether the local runner pulls an image it does not have (off: air-gapped hosts).",
    )
    docker_runtime: str = setting(
        "runc",
        "PYEXEC_DOCKER_RUNTIME",
        parse=_runtime,
        help="OCI runtime of the sandbox containers, as registered with dockerd (and the Nomad "
        "docker driver): `runc`, or `runsc` for gVisor (see docs/security.md).",
    )

    # --- Warm pool (local Docker runner; Nomad: pre-dispatched allocations) ---------------
    pool_size: int = setting(
        2,
        "PYEXEC_POOL_SIZE",
        parse=int,
        help="Single-use sandboxes the local runner keeps started and waiting, per pooled "
        "image, for requests of the default shape (0: no pool). Each serves one execution "
        "and is then destroyed; they count against PYEXEC_MAX_IN_FLIGHT only while they serve. "
        "On Nomad: allocations of the default class's pool job kept waiting per image, per "
        "service process (docs/pool.md).",
    )
    pool_images: tuple[str, ...] = setting(
        (),
        "PYEXEC_POOL_IMAGES",
        parse=_list,
        help="Images the pool keeps sandboxes of (empty: the default image and the eval images).",
    )
    pool_max_idle_seconds: float = setting(
        300.0,
        "PYEXEC_POOL_MAX_IDLE_SECONDS",
        parse=float,
        help="A pooled sandbox that waited this long unused is replaced by a fresh one.",
    )

    # --- Consul store --------------------------------------------------------------------
    consul_addr: str | None = setting(
        None,
        "PYEXEC_CONSUL_ADDR",
        "CONSUL_HTTP_ADDR",
        parse=_optional_str,
        help="Consul HTTP address (`host:port` or URL). Setting it selects the Consul store.",
    )
    consul_token: str | None = setting(
        None, "CONSUL_HTTP_TOKEN", parse=_optional_str, help="Consul ACL token."
    )
    consul_cacert: str | None = setting(
        None, "CONSUL_CACERT", parse=_optional_str, help="CA bundle for Consul's TLS."
    )
    consul_client_cert: str | None = setting(
        None, "CONSUL_CLIENT_CERT", parse=_optional_str, help="Client certificate for Consul."
    )
    consul_client_key: str | None = setting(
        None, "CONSUL_CLIENT_KEY", parse=_optional_str, help="Client key for Consul."
    )
    consul_prefix: str = setting(
        "pyexec", "PYEXEC_CONSUL_PREFIX", help="KV prefix under which executions are kept."
    )

    # --- Nomad runner ------------------------------------------------------------------
    nomad_addr: str | None = setting(
        None,
        "PYEXEC_NOMAD_ADDR",
        "NOMAD_ADDR",
        parse=_optional_str,
        help="Nomad HTTP address. Setting it (with Consul) selects the Nomad runner.",
    )
    nomad_token: str | None = setting(None, "NOMAD_TOKEN", parse=_optional_str, help="ACL token.")
    nomad_namespace: str | None = setting(
        None, "NOMAD_NAMESPACE", parse=_optional_str, help="Nomad namespace of the runner jobs."
    )
    nomad_region: str | None = setting(
        None, "NOMAD_REGION", parse=_optional_str, help="Nomad region."
    )
    nomad_cacert: str | None = setting(
        None, "NOMAD_CACERT", parse=_optional_str, help="CA bundle for Nomad's TLS."
    )
    nomad_client_cert: str | None = setting(
        None, "NOMAD_CLIENT_CERT", parse=_optional_str, help="Client certificate for Nomad."
    )
    nomad_client_key: str | None = setting(
        None, "NOMAD_CLIENT_KEY", parse=_optional_str, help="Client key for Nomad."
    )
    nomad_datacenters: tuple[str, ...] = setting(
        ("*",), "PYEXEC_NOMAD_DATACENTERS", parse=_list, help="Datacenters of the runner jobs."
    )
    nomad_node_pool: str | None = setting(
        None, "PYEXEC_NOMAD_NODE_POOL", parse=_optional_str, help="Node pool of the runner jobs."
    )
    nomad_constraints: tuple[str, ...] = setting(
        (),
        "PYEXEC_NOMAD_CONSTRAINTS",
        parse=_list,
        help="Extra runner-job constraints as `attribute operator value`, comma-separated.",
    )
    nomad_job_prefix: str = setting(
        "pyexec-runner", "PYEXEC_NOMAD_JOB_PREFIX", help="Runner job IDs are `<prefix>-<class>`."
    )
    nomad_resource_classes: tuple[ResourceClass, ...] = setting(
        (
            ResourceClass("small", 500, 512, 1024),
            ResourceClass("medium", 1000, 2048, 4096),
            ResourceClass("large", 2000, 8192, 10240),
        ),
        "PYEXEC_NOMAD_RESOURCE_CLASSES",
        parse=_resource_classes,
        help="Runner job sizes as `name:cpu_mhz:memory_mb:disk_mb`, comma-separated.",
    )
    nomad_consul_addr: str | None = setting(
        None,
        "PYEXEC_NOMAD_CONSUL_ADDR",
        parse=_optional_str,
        help="Consul address as the runner tasks reach it (default: the service's own).",
    )
    nomad_placement_timeout: float = setting(
        300.0,
        "PYEXEC_NOMAD_PLACEMENT_TIMEOUT",
        parse=float,
        help="Seconds an execution may wait for placement before it fails.",
    )
    nomad_trusted_image: str | None = setting(
        None,
        "PYEXEC_NOMAD_TRUSTED_IMAGE",
        parse=_optional_str,
        help="Image of the runner jobs' trusted tasks (the requirements installer, the record "
        "writer of plain dispatches); never the request's. Default: PYEXEC_DEFAULT_IMAGE.",
    )
    nomad_seccomp_profile: str | None = setting(
        None,
        "PYEXEC_NOMAD_SECCOMP_PROFILE",
        parse=_optional_str,
        help="Path, on every Nomad client, of the sandbox's seccomp profile (a copy of "
        "pyexec/sandbox/seccomp.json) for the run task; the docker driver reads the file "
        "itself. Unset: Docker's default profile.",
    )
    nomad_register_jobs: bool = setting(
        True,
        "PYEXEC_NOMAD_REGISTER_JOBS",
        parse=_bool,
        help="Register the jobs the service uses that Nomad lacks at start-up (existing "
        "jobs are never overwritten: `pyexec job register` updates them).",
    )
    nomad_task_env: tuple[tuple[str, str], ...] = setting(
        (),
        "PYEXEC_NOMAD_TASK_ENV",
        parse=_mapping,
        help="Extra environment of every runner task, as `KEY=VALUE`, comma-separated.",
    )
    nomad_templates: str | None = setting(
        None,
        "PYEXEC_NOMAD_TEMPLATES",
        parse=_optional_str,
        help="JSON file of extra templates for the runner tasks: a list of Nomad API "
        "`Template` objects, each with an optional `Tasks` list (default: the trusted tasks "
        "`install` and `finish`; name `run` only for what user code may read).",
    )
    nomad_consul_token_variable: str | None = setting(
        None,
        "PYEXEC_NOMAD_CONSUL_TOKEN_VARIABLE",
        parse=_optional_str,
        help="Path of a Nomad variable whose `consul_token` item the record writer task uses "
        "as CONSUL_HTTP_TOKEN (absent variable: no token).",
    )

    # --- Dependency cache (pyexec.deps, docs/deps-cache.md) -------------------------------
    deps_cache_bytes: int = setting(
        4096 * MiB,
        "PYEXEC_DEPS_CACHE_BYTES",
        parse=int,
        help="Size cap of the dependency cache (bytes): ready environments past it are evicted "
        "least recently used first, never one in use. 0 turns the cache off (requirements are "
        "installed by each run, as before).",
    )
    deps_cache_dir: str = setting(
        "/var/lib/pyexec/deps",
        "PYEXEC_DEPS_CACHE_DIR",
        help="Directory of the local runner's dependency cache, a path on the Docker host (bind-"
        "mounted read-only into runs); a service in a container needs it at the same path.",
    )
    deps_prewarm: tuple[tuple[str, ...], ...] = setting(
        (),
        "PYEXEC_DEPS_PREWARM",
        parse=_requirement_sets,
        help="Requirement sets built at start-up in the background, `;` between sets, spaces "
        "within one (`numpy;pandas;numpy pandas matplotlib`). With PYEXEC_SETUP_NETWORK off, "
        "exactly these sets are the requirements a request may have.",
    )
    deps_pool_size: int = setting(
        1,
        "PYEXEC_DEPS_POOL_SIZE",
        parse=int,
        help="Sandboxes the local runner keeps waiting per PYEXEC_DEPS_PREWARM set and pooled "
        "image (with PYEXEC_POOL_SIZE above 0), the set's modules already imported in the "
        "program's interpreter: `import numpy` then costs nothing. Each holds its modules' "
        "memory while it waits (0: none; such runs use the plain pool). Local Docker only.",
    )
    deps_index_url: str | None = setting(
        "https://pypi.org/simple",
        "PYEXEC_DEPS_INDEX_URL",
        parse=_optional_str,
        help="Package index of the trusted builder (pip --index-url); empty: no index, only "
        "PYEXEC_DEPS_FIND_LINKS (and the builder gets no network).",
    )
    deps_find_links: str | None = setting(
        None,
        "PYEXEC_DEPS_FIND_LINKS",
        parse=_optional_str,
        help="Host directory of wheels mounted read-only into the trusted builder (pip "
        "--find-links), e.g. a mirror for hosts without an index.",
    )
    deps_builder_image: str | None = setting(
        None,
        "PYEXEC_DEPS_BUILDER_IMAGE",
        parse=_optional_str,
        help="Trusted image that builds environments (never the request's; needs pip). "
        "Default: PYEXEC_NOMAD_TRUSTED_IMAGE, else PYEXEC_DEFAULT_IMAGE.",
    )
    deps_build_timeout: float = setting(
        600.0,
        "PYEXEC_DEPS_BUILD_TIMEOUT",
        parse=float,
        help="Seconds one environment may take to build; a request waiting for it (its own "
        "build or another's) waits at most this long.",
    )
    nomad_deps_volume: str | None = setting(
        None,
        "PYEXEC_NOMAD_DEPS_VOLUME",
        parse=_optional_str,
        help="Nomad host volume holding each node's dependency cache (read-write in the "
        "installer task, read-only in the run task); unset: the installer installs per run.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from an environment mapping; ``overrides`` win over it."""
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            if field.name in overrides:
                continue
            for name in env_names(field):
                raw = environ.get(name)
                if raw is None:
                    continue
                try:
                    values[field.name] = field.metadata["parse"](raw)
                except ValueError as exc:
                    raise SettingsError(f"{name}: {exc}", name=name) from None
                break
        values.update(overrides)
        return cls(**values)

    def __attrs_post_init__(self) -> None:
        """Refuse values no service could run with, each error naming its variable."""
        for problem in self._problems():
            raise SettingsError(problem[1], name=problem[0])

    def _problems(self) -> Iterator[tuple[str, str]]:
        """Each invalid value as (variable, one-line message), cross-field rules included."""

        def var(name: str) -> str:
            return env_names(attrs.fields_dict(Settings)[name])[0]

        def shown(name: str) -> str:
            return f"{var(name)}={getattr(self, name)}"

        if not 1 <= self.port <= 65535:
            yield var("port"), f"{shown('port')} is not a port number (1-65535)"
        if not self.host.strip():
            yield var("host"), f"{var('host')} is empty"
        if self.log_format not in LOG_FORMATS:
            yield (
                var("log_format"),
                f"{shown('log_format')} is not one of {', '.join(LOG_FORMATS)}",
            )
        if self.log_level.upper() not in LOG_LEVELS:
            yield var("log_level"), f"{shown('log_level')} is not one of {', '.join(LOG_LEVELS)}"
        for name in (
            "shutdown_grace_seconds",
            "launch_grace_seconds",
            "max_in_flight",
            "cleanup_ttl",
            "deps_cache_bytes",
            "deps_pool_size",
        ):
            if not getattr(self, name) >= 0:  # also refuses NaN
                yield var(name), f"{shown(name)} must be 0 or more"
        positive = (
            "max_tar_bytes",
            "max_tar_entries",
            "max_extracted_bytes",
            "max_eval_code_bytes",
            "nomad_placement_timeout",
            "deps_build_timeout",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                yield var(name), f"{shown(name)} must be more than 0"
        for key, (default, maximum) in CONFIG_FIELDS.items():
            low = CONFIG_MINIMA[key]
            if getattr(self, default) < low:
                yield var(default), f"{shown(default)} is below the smallest allowed, {low}"
            elif getattr(self, default) > getattr(self, maximum):
                yield var(default), f"{shown(default)} exceeds {shown(maximum)}"
        versions = dict(self.python_images)
        if self.default_python_version not in versions:
            yield (
                var("default_python_version"),
                f"{shown('default_python_version')} is not a version of PYEXEC_PYTHON_IMAGES "
                f"({', '.join(versions) or 'none'})",
            )
        images = [
            ("default_image", self.default_image),
            *(("python_images", image) for _, image in self.python_images),
            *(("allowed_images", image) for image in self.allowed_images if image != "*"),
        ]
        for name, image in images:
            if not is_valid_reference(image):
                yield var(name), f"{var(name)}: {image!r} is not a valid image reference"
        names = [c.name for c in self.nomad_resource_classes]
        if not names or len(set(names)) != len(names):
            yield (
                var("nomad_resource_classes"),
                f"{var('nomad_resource_classes')} needs at least one class and unique names",
            )
        for rc in self.nomad_resource_classes:
            if min(rc.cpu_mhz, rc.memory_mb, rc.disk_mb) <= 0:
                yield (
                    var("nomad_resource_classes"),
                    f"{var('nomad_resource_classes')}: class {rc.name!r} needs sizes above 0",
                )
        if not 0.05 <= self.output_flush_seconds <= 10:  # also refuses NaN
            yield (
                var("output_flush_seconds"),
                f"{shown('output_flush_seconds')} must be from 0.05 to 10",
            )
        if not self.max_event_subscribers >= 1:
            yield (
                var("max_event_subscribers"),
                f"{shown('max_event_subscribers')} must be 1 or more",
            )

    def tokens(self) -> frozenset[str]:
        """All accepted API tokens (inline and from the token file)."""
        tokens = set(self.api_tokens)
        if self.api_token_file:
            try:
                with open(self.api_token_file, encoding="utf-8") as fh:
                    lines = fh.read().splitlines()
            except OSError as exc:
                raise SettingsError(
                    f"PYEXEC_API_TOKEN_FILE: cannot read {self.api_token_file}: {exc.strerror}",
                    name="PYEXEC_API_TOKEN_FILE",
                ) from None
            stripped = (line.strip() for line in lines)
            tokens.update(line for line in stripped if line and not line.startswith("#"))
        return frozenset(tokens)

    def exposed_without_tokens(self, tokens: frozenset[str]) -> bool:
        """Whether serving on ``host`` with ``tokens`` lets anyone who reaches it run code."""
        if tokens:
            return False
        host = self.host.strip().strip("[]")
        if host.lower() in LOOPBACK_HOSTS:
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return True

    @property
    def pooled_images(self) -> tuple[str, ...]:
        """The images the warm pool keeps sandboxes of (none when ``pool_size`` is 0)."""
        if self.pool_size <= 0:
            return ()
        images = self.pool_images or (self.default_image, *(i for _, i in self.python_images))
        return tuple(dict.fromkeys(images))

    @property
    def deps_builder(self) -> str:
        """The trusted image that builds dependency environments."""
        return self.deps_builder_image or self.nomad_trusted_image or self.default_image

    def deps_prewarmed(self, requirements_txt: str) -> bool:
        """Whether ``requirements_txt`` is one of the operator's PYEXEC_DEPS_PREWARM sets
        (with the cache on): the only requirements a server whose setup phase has no network
        takes, served by the trusted builder (see docs/deps-cache.md)."""
        if self.deps_cache_bytes <= 0 or not self.deps_prewarm:
            return False
        from .deps.key import NotCacheable, normalise_requirements

        try:
            return normalise_requirements(requirements_txt) in self.deps_prewarm
        except NotCacheable:
            return False

    @property
    def backend(self) -> str:
        """Which backends the app factory wires: ``embedded``, ``consul`` or ``nomad``."""
        if self.nomad_addr:
            return "nomad"
        if self.consul_addr:
            return "consul"
        return "embedded"
