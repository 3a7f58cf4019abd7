"""The ``ncservice`` command line and Python client."""
