"""Repository-specific pytest configuration.

The `circuits` plugin itself (claim fixture, zoo fixtures, options, reports) is registered through the
`pytest11` entry point of the installed `pytest-circuits` distribution, so it is not listed here again.
"""
