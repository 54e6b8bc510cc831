"""The ``lm-eval-bh`` subcommands, one module each with ``add_arguments(parser)`` and ``run(args)``.

Library modules never import from here; these modules sit at the end of the one-way data flow.
"""
