"""Build script: metadata lives in setup.cfg; this only declares the
optional C fast path (ovs_ipfix_py/_fastpath.c).  ``optional=True``: where
it cannot be compiled (no C compiler or Python headers) the install still
succeeds and the pure-Python path runs."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ovs_ipfix_py._fastpath",
            ["ovs_ipfix_py/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra",
                                "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
