"""Repository tools (not part of the installed ``medse`` package): run from the repository root, e.g.
``python -m tools.docsync --check``. They import ``medse``; ``medse`` never imports them."""
