"""The command-line tools: ``deeplab-train`` etc. once installed (``pyproject.toml``),
``python train.py`` etc. in a checkout (thin scripts that call these ``main`` functions).

Each module parses its arguments and calls the package; ``main(argv)`` returns the
exit code and ``cli`` is the installed entry point.
"""
