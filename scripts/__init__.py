"""Command-line tools: ``python -m scripts.<name>`` (error convention in :mod:`scripts.cli`).

``import monai`` imports the MONAI Deploy SDK's holoscan, which warns on stderr when the soft stack limit
is below 32 MiB. The limit is raised here, up to the hard limit, as holoscan recommends, so that what a
tool prints on stderr is its own.
"""

try:
    import resource

    _soft, _hard = resource.getrlimit(resource.RLIMIT_STACK)
    _want = 32 * 1024 * 1024
    if _soft != resource.RLIM_INFINITY and _soft < _want and (_hard == resource.RLIM_INFINITY or _hard >= _want):
        resource.setrlimit(resource.RLIMIT_STACK, (_want, _hard))
except (ImportError, OSError, ValueError):  # no resource module (Windows) or a limit we may not raise
    pass
