"""Warm dependency environments: built once by a trusted builder, mounted read-only.

A request's requirements become an ``EnvKey`` (``key``: normalised requirements,
target Python and platform, installer). The rules of a cache directory (the marker
written last and checked before an environment is published, one builder per key,
least-recently-used eviction that skips environments in use) live once in
``cachedir``, standard library only, so the Nomad installer task runs the same file.
``cache.DepsCache`` hands out leases of finished environments on one host, building
them with a backend's builder: ``docker`` (the local runner: a trusted builder
container, a cache directory bind-mounted read-only into runs) and ``nomad`` (the
runner job's trusted ``install`` task builds into a Nomad host volume on its node).
See docs/deps-cache.md.
"""
