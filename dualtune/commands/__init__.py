"""One module per ``dualtune`` command: each has ``NAME``, ``add_parser(subparsers)`` (its arguments
and help) and ``main(args) -> int`` (the exit status). ``dualtune.cli`` lists them in ``COMMANDS``."""
