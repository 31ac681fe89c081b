"""pyexec as a Model Context Protocol tool server (``pip install 'pyexec[mcp]'``).

``tools`` defines the tools; ``stdio`` serves them as ``pyexec mcp`` against a pyexec
server; ``http`` mounts them at ``/mcp`` in ``pyexec serve``. See docs/mcp.md.
"""
