"""``tools/fuzz/run``: every fuzz target, the C ones on the sanitizer build.

    tools/fuzz/run [--seconds=S | --runs=N] [--merge] [--no-sanitizers]
                   [--python-coverage] [--diff-every=K] [--seeds]
                   [TARGET...]

Runs each TARGET of ``tools/fuzz/targets.py`` (default: all) under
atheris, one after the other, for S seconds (default 30) or N
executions.  The targets that run C code (``targets.RUNS_C``: decode,
batch) load ``_fastpath.c`` built with ASan + UBSan + libFuzzer coverage
(``tools/fuzz/build-sanitized``) with the ASan runtime preloaded, and
are guided by the C code's coverage (``--python-coverage`` adds the
Python code's, at 4 to 6 times the cost of an execution); there the
batch target runs its pure-Python twin on one input in K (default 8,
``--diff-every``; every input when replayed by the tests).  The
pure-Python targets (parse, config) run on the plain interpreter,
guided by Python coverage: no sanitizer has anything to check there.
``--no-sanitizers`` runs the C targets on the package's own build too,
with Python coverage and the twin on every input.

Corpora: ``tests/fuzz_corpus/<target>/`` (kept in git and replayed by
``tests/test_fuzz_corpus.py``) is read; new inputs go to
``build/fuzz/corpus/<target>/``; a crash input is written to
``tests/fuzz_corpus/<target>/crash-<sha1>`` and fails the run, so that
once fixed it stays as a regression case.  ``--merge`` then adds to
``tests/fuzz_corpus/<target>/`` the new inputs that cover something the
kept ones do not (libFuzzer's -merge=1).  ``--seeds`` (re)writes the
seed inputs (``seeds()`` in targets.py) into the kept corpus.

Prints, per target, the build and coverage it ran with, executions,
seconds, executions per second and the final coverage (libFuzzer's
"cov": edges of the C code, and of the Python code when instrumented).
Exit status 1 if any target found a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

#: ASan for a Python host: no leak report (the interpreter keeps memory
#: until exit by design), a small quarantine and no allocation stacks
#: (else RSS grows by ~40 KB per execution and speed drops 4x).
ASAN_OPTIONS = ("detect_leaks=0:quarantine_size_mb=16:malloc_context_size=2"
                ":abort_on_error=1:halt_on_error=1")
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"
DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
COV = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")


def write_seeds(names):
    import targets
    for name in names:
        d = os.path.join(ROOT, "tests", "fuzz_corpus", name)
        os.makedirs(d, exist_ok=True)
        for data in targets.seeds(name):
            path = os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest())
            with open(path, "wb") as f:
                f.write(data)


def target_env(name, args, env, sanitized_env):
    """(environment, description) a target runs with."""
    import targets
    if name in targets.RUNS_C and sanitized_env is not None:
        env = dict(sanitized_env)
        env["OVS_IPFIX_FUZZ_DIFF_EVERY"] = str(args.diff_every)
        pycov = args.python_coverage
        what = "ASan+UBSan C, %s coverage" % ("C+Python" if pycov else "C")
    else:
        # The plain build has no coverage counters in its C code.
        env = dict(env)
        pycov = True
        what = "%s, Python coverage" % (
            "plain C" if name in targets.RUNS_C else "pure Python")
    env["OVS_IPFIX_FUZZ_PYCOV"] = "1" if pycov else "0"
    return env, what


def run_target(name, args, env, what):
    kept = os.path.join(ROOT, "tests", "fuzz_corpus", name)
    scratch = os.path.join(ROOT, "build", "fuzz", "corpus", name)
    os.makedirs(kept, exist_ok=True)
    os.makedirs(scratch, exist_ok=True)
    limit = ("-runs=%d" % args.runs if args.runs
             else "-max_total_time=%d" % args.seconds)
    argv = [sys.executable, os.path.join(HERE, "fuzz.py"), name, scratch,
            kept, limit, "-max_len=4096", "-timeout=20", "-rss_limit_mb=3072",
            "-print_final_stats=1",
            "-artifact_prefix=%s/" % kept]
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace")
    elapsed = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines()
             if not ln.startswith("INFO: Instrumenting")]
    runs = cov = ft = corp = 0
    for ln in lines:
        m = DONE.match(ln)
        if m:
            runs = int(m.group(1))
        m = COV.match(ln)
        if m:
            cov, ft, corp = int(m.group(2)), int(m.group(3)), int(m.group(4))
    ok = proc.returncode == 0
    if not ok:
        print("\n".join(lines[-60:]))
    if ok and args.merge:
        subprocess.run([sys.executable, os.path.join(HERE, "fuzz.py"), name,
                        "-merge=1", kept, scratch], env=env, cwd=ROOT,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
    kept_n = len(os.listdir(kept))
    print("fuzz %-7s %s: %9d runs in %5.0f s (%6.0f/s), cov %d, ft %d, "
          "corpus %d (kept %d) [%s]" % (
              name, "ok  " if ok else "CRASH", runs, elapsed,
              runs / max(elapsed, 1e-9), cov, ft, corp, kept_n, what),
          flush=True)
    return ok


def main(argv=None):
    import targets
    p = argparse.ArgumentParser(prog="tools/fuzz/run",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", metavar="TARGET")
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--runs", type=int, default=0)
    p.add_argument("--merge", action="store_true")
    p.add_argument("--seeds", action="store_true")
    p.add_argument("--no-sanitizers", action="store_true")
    p.add_argument("--python-coverage", action="store_true")
    p.add_argument("--diff-every", type=int, default=8, metavar="K")
    args = p.parse_args(argv)
    names = args.targets or list(targets.TARGETS)
    for n in names:
        if n not in targets.TARGETS:
            p.error("unknown target %s (have: %s)"
                    % (n, ", ".join(targets.TARGETS)))
    if args.seeds:
        write_seeds(names)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    sanitized = None
    if not args.no_sanitizers and set(names) & set(targets.RUNS_C):
        ext = subprocess.run([os.path.join(HERE, "build-sanitized")],
                             cwd=ROOT, check=True, stdout=subprocess.PIPE,
                             text=True).stdout.strip()
        import atheris
        sanitized = dict(env)
        sanitized["OVS_IPFIX_FUZZ_EXT"] = os.path.join(ROOT, ext)
        sanitized["LD_PRELOAD"] = os.path.join(atheris.path(),
                                               "asan_with_fuzzer.so")
        sanitized["ASAN_OPTIONS"] = ASAN_OPTIONS
        sanitized["UBSAN_OPTIONS"] = UBSAN_OPTIONS
    ok = True
    for name in names:
        target_env_, what = target_env(name, args, env, sanitized)
        ok = run_target(name, args, target_env_, what) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
