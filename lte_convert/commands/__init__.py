"""The application layer: one module per `lte-convert` command (train, fold, eval, export,
validate, build, bench, and run, the one-shot). A command checks its paths and options,
calls the compute rooms (converter, plugins, exporters, trt_plugins) and prints what they
did. The rooms never import this package; lte_convert/cli.py is the click group over it.

Shared click pieces live in lte_convert/commands/options.py.
"""
