"""``python -m uploader.cli``: the package's first lines installed the early signal handlers."""

from uploader.cli import main

main()
