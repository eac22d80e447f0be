"""Sessions: the whole suite, each plugin alone, the SDK alone, the demo, benchmarks, lint.

Every session installs torch from constraints.txt (the CPU build on these machines' disk).
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
PLUGINS = sorted(p.name for p in (ROOT / "plugins").glob("dt-*") if (p / "pyproject.toml").exists())
nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


def _host(session: nox.Session, *extra: str) -> None:
    session.install("-c", "constraints.txt", "torch==2.13.0", "-e", ".", *extra)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite (what .ci/run runs), in one environment with everything installed."""
    session.install("-r", "requirements-dev.txt")
    session.run("pytest", *session.posargs)


@nox.session
@nox.parametrize("plugin", PLUGINS)
def plugin(session: nox.Session, plugin: str) -> None:
    """One plugin alone next to the host (and the SDK's conformance kit), with its own tests."""
    _host(session, "-e", "./sdk", "-e", f"./plugins/{plugin}[test]", "pytest")
    session.run("dt", "list")
    session.run("pytest", f"plugins/{plugin}", *session.posargs)


@nox.session
def sdk(session: nox.Session) -> None:
    """The SDK alone next to the host."""
    _host(session, "-e", "./sdk", "pytest")
    session.run("pytest", "sdk/tests", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """`dt demo` with every plugin installed (writes dt-demo/contact_sheet.png and report.md)."""
    session.install("-r", "requirements-dev.txt")
    session.run("dt", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against diffusers' own mechanisms; writes docs/performance.md."""
    session.install("-r", "requirements-dev.txt")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def reliability(session: nox.Session) -> None:
    """Faults, concurrency, plugin isolation, untrusted files and fuzzing at 5x the CI sizes
    (``-- --scale N``); writes the table in docs/reliability.md."""
    session.install("-r", "requirements-dev.txt")
    session.run("python", "tests/reliability/report.py", *session.posargs)


@nox.session(name="support-matrix")
def support_matrix(session: nox.Session) -> None:
    """Regenerate docs/support-matrix.md from the installed adapters and carriers."""
    session.install("-r", "requirements-dev.txt")
    session.run("python", "-m", "diffusion_templates.support_matrix", "docs/support-matrix.md")


#: Every distribution of the repository: the host, the SDK, each plugin.
DISTRIBUTIONS = [".", "sdk", *(f"plugins/{p}" for p in PLUGINS)]


@nox.session
def build(session: nox.Session) -> None:
    """Wheels and sdists of every distribution into dist/, then ``twine check`` of their metadata.

    ``pip install --no-index --find-links dist dt-template-superres`` then installs a capability by
    name, the host coming in as its dependency (tests/test_install_by_name.py does that offline).
    """
    session.install("build", "twine")
    out = ROOT / "dist"
    for dist in DISTRIBUTIONS:
        session.run("python", "-m", "build", "--outdir", str(out), dist)
    session.run("twine", "check", "--strict", *sorted(str(p) for p in out.iterdir()))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session(name="train-shapes")
def train_shapes(session: nox.Session) -> None:
    """Retrain the embedded base model dt-base-shapes into ``-- --out FOLDER`` (about 45 minutes of one
    core; the committed weights came from this command). Then copy FOLDER over
    plugins/dt-base-shapes/src/dt_base_shapes/weights/ and run ``nox -s train-templates``."""
    _install_dev_unless_no_venv(session)
    args = session.posargs or ["--out", "dt-base-shapes-weights"]
    session.run("dt-base-shapes", "train", *args)


#: The trained zoo templates and the modules that rebuild their shipped "shapes" weights.
TRAINED_TEMPLATES = {
    "brightness-kv": "dt_template_brightness.shapes",
    "color-kv": "dt_template_color.shapes",
    "structure-kv": "dt_template_depth.shapes",
}


def _install_dev_unless_no_venv(session: nox.Session) -> None:
    """requirements-dev.txt, except with ``--no-venv`` (then the current environment is used as is)."""
    if session.venv_backend != "none":
        session.install("-r", "requirements-dev.txt")


@nox.session(name="train-templates")
def train_templates(session: nox.Session) -> None:
    """Retrain the shipped "shapes" weights of brightness-kv, color-kv and structure-kv on the embedded
    dt-base-shapes model (rerun after the base model changes; about 5 minutes each on one core).
    ``-- NAME ...`` retrains only those templates; ``--no-venv`` uses the current environment."""
    _install_dev_unless_no_venv(session)
    names = session.posargs or list(TRAINED_TEMPLATES)
    for name in names:
        session.run("python", "-m", TRAINED_TEMPLATES[name], env={"OMP_NUM_THREADS": "1"})


@nox.session(name="zoo-results")
def zoo_results(session: nox.Session) -> None:
    """Measure the trained templates next to the training-free ones; writes docs/zoo-results.md
    (``--no-venv``: in the current environment)."""
    _install_dev_unless_no_venv(session)
    session.run("python", "bench/zoo_results.py", *session.posargs, env={"OMP_NUM_THREADS": "1"})
