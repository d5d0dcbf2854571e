import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "wmgr" / "__init__.py").read_text()).group(1)

setup(
    name="wmgr",
    version=VERSION,
    description="Worker management daemon: the wr job queue, the pman API, a connection registry, Qserv's "
                "services and databases, and workers on many hosts with Flamenco's tasks over HTTPS; a web "
                "dashboard and a command line",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # twisted/plugins has no __init__.py on purpose: one would shadow Twisted's own package.
    packages=find_packages(include=["wmgr", "wmgr.*"]) + ["twisted.plugins"],
    package_data={"wmgr": ["static/*"]},  # the dashboard's page
    install_requires=[
        # >= 24.7: inlineCallbacks and LoopingCall accept coroutines, so async def works everywhere.
        "twisted[tls]>=24.7",
        "klein>=23.5",
        "treq>=23.11",
        "pyopenssl>=24.0",
        # >= 24.1: 23.1 broke Twisted's hostname verification (twisted/twisted#12074).
        "service-identity>=24.1",
        "cryptography>=42",
        "psutil>=5.9",
        # wr's job keys are FarmHash Fingerprint128; clients that compute keys must find their jobs.
        "pyfarmhash>=0.3",
        # The `wmgr` command's tables and live progress bars: well kept, pure Python, no compiled
        # parts, and it degrades to plain text when the output is not a terminal.
        "rich>=13",
        # /metrics: the reference Prometheus client, so the exposition format (escaping, HELP/TYPE,
        # histograms) is right by construction; per-daemon registries and custom collectors let the
        # job counts be read from the domain at scrape time, with no calls on the hot paths.
        "prometheus_client>=0.17",
    ],
    extras_require={
        # The databases API's MySQL/MariaDB backend ([dbs] backend = mysql). pymysql: pure Python
        # (no client library or compiler to install), and it streams LOAD DATA LOCAL INFILE.
        "mysql": ["pymysql>=1.1"],
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.1",
            "openapi-spec-validator>=0.7",
            "pfurl>=2.3",
            # The databases API's tests run on MariaDB as well as SQLite.
            "pymysql>=1.1",
            # Property-based fuzzing of every operation of /openapi.json against the real daemon.
            "schemathesis>=4.0",
        ],
        # bench/connections.py's baseline: the original connectivity server's stack (Flask under
        # gunicorn), so that its figures compare against that design in the same run.
        "bench": ["flask>=2.1", "gunicorn>=20.1"],
    },
    entry_points={"console_scripts": ["wmgr=wmgr.cli:main"]},
    # A flat layout with a top-level twisted/plugins: the default (strict) editable install hides
    # that folder from twistd's plugin scan, so editable installs put the project root on sys.path.
    options={"editable_wheel": {"mode": "compat"}},
    classifiers=["Framework :: Twisted", "Programming Language :: Python :: 3"],
)
