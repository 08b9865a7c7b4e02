"""kvpolicy's built-in plugins, installed as the package ``kvpolicy_plugins``.

Each module is a plugin registered through an entry point in group ``kvpolicy`` (see
``pyproject.toml``), exactly as a third party's plugin would be; the core never imports them.
"""
