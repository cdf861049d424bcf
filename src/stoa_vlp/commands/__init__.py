"""Subcommands of the `stoa-vlp` command line (see stoa_vlp.cli)."""
