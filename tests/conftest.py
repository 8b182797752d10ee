"""Shared fixtures: a private ovsdb-server per test, and a factory for
tests that need several.  Every process started here is stopped by pid
file in the fixture's finally, whatever the test's outcome."""

import os
import shutil
import sys
import tempfile

import pytest

# The package is importable from a plain checkout, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from support.ovsdb import OvsdbServer  # noqa: E402

# Fixtures defined beside their harness, for every test module.
from support.switch import pair  # noqa: E402, F401


def short_tempdir(prefix):
    """A fresh directory directly under /tmp: unix socket paths inside
    stay far below the 108-byte limit (pytest's tmp_path does not)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@pytest.fixture
def shorttmp():
    """A fresh ``short_tempdir``, removed after the test."""
    d = short_tempdir("t-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ovsdb_factory():
    """Call it (optionally with ``schema=``) to get started
    OvsdbServer instances; all are stopped and removed afterwards."""
    servers = []

    def make(schema=None, start=True):
        kwargs = {"schema": schema} if schema else {}
        server = OvsdbServer(short_tempdir("ovsdb-"), **kwargs)
        servers.append(server)
        return server.start() if start else server

    try:
        yield make
    finally:
        for server in servers:
            server.cleanup()


@pytest.fixture
def ovsdb(ovsdb_factory):
    """A started OvsdbServer with an initialised Open_vSwitch db."""
    return ovsdb_factory()
