#!/usr/bin/env python3
"""Run one fuzz target (tools/fuzz/targets.py) under atheris.

    python3 tools/fuzz/fuzz.py TARGET [CORPUS_DIR...] [-libfuzzer_flag=...]

With ``OVS_IPFIX_FUZZ_EXT`` naming a build of ``_fastpath.c`` (from
``tools/fuzz/build-sanitized``), that file is loaded as
``ovs_ipfix_py._fastpath`` instead of the package's own, so the C code
runs with AddressSanitizer and UndefinedBehaviorSanitizer; the process
must then start with the ASan runtime preloaded (``tools/fuzz/run`` does
it).  With ``OVS_IPFIX_FUZZ_PYCOV=1`` the ovs_ipfix_py modules are
imported under atheris's instrumentation, so coverage of the Python code
guides the search as well as the C code's counters (at 4 to 6 times the
cost of an execution); without it only the C code's counters do.
Everything after TARGET goes to libFuzzer (``-runs=N``,
``-max_total_time=S``, corpus directories...).
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import atheris  # noqa: E402


def load_extension(path: str) -> None:
    """Make ``path`` the module ``ovs_ipfix_py._fastpath``."""
    import ovs_ipfix_py  # noqa: F401  (the parent package first)

    spec = importlib.util.spec_from_file_location(
        "ovs_ipfix_py._fastpath", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["ovs_ipfix_py._fastpath"] = module


def main() -> None:
    # libFuzzer's -merge=1 and -fork re-run argv[0] with its own
    # arguments: the target name travels in the environment.
    name = os.environ.get("OVS_IPFIX_FUZZ_TARGET")
    if name is None:
        if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
            sys.exit(__doc__)
        name = sys.argv.pop(1)
        os.environ["OVS_IPFIX_FUZZ_TARGET"] = name
    ext = os.environ.get("OVS_IPFIX_FUZZ_EXT")
    if ext:
        load_extension(ext)
    python_coverage = os.environ.get("OVS_IPFIX_FUZZ_PYCOV") == "1"
    if python_coverage:
        with atheris.instrument_imports(include=["ovs_ipfix_py",
                                                 "targets"]):
            import targets
    else:
        import targets
    from ovs_ipfix_py import fastpath
    if ext:
        assert fastpath.C is sys.modules["ovs_ipfix_py._fastpath"]
    print("fuzz: target %s, fast path %s%s, coverage of %s" % (
        name, fastpath.name(), " (sanitized: %s)" % ext if ext else "",
        "C and Python" if python_coverage else "C"),
        file=sys.stderr, flush=True)
    target = targets.TARGETS[name]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
