"""pyexec: run untrusted Python in locked-down containers.

Importing ``pyexec`` (or ``pyexec.client``, ``pyexec.cli``) stays light: it never pulls in
the server's dependencies, so a client-only install works.
"""

from .__about__ import __version__

__all__ = ["__version__"]
