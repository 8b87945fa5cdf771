"""The container stack fixture: images built from this checkout, the compose stack up on free
host ports, and always torn down (`down -v`), which must leave nothing behind. Figures (build
and start-up times, image sizes, the chaos run's counts) are printed at the end of the run."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from deploy.containers.stack import ComposeStack

FIGURES = pytest.StashKey[dict[str, str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[FIGURES] = {}


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, {})
    if figures:
        terminalreporter.section("container stack figures")
        for name, value in figures.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config) -> dict[str, str]:
    return pytestconfig.stash[FIGURES]


@pytest.fixture(scope="session")
def stack(request, tmp_path_factory, figures, coffee_jpeg) -> Iterator[ComposeStack]:
    """The stack, up and answering Predict."""
    started = time.monotonic()
    stack = ComposeStack(tmp_path_factory.mktemp("stack"))
    figures["local base image (made, or found in the cache)"] = (
        f"{time.monotonic() - started:.0f} s"
    )
    for service, seconds in stack.build().items():
        figures[f"build {service}"] = f"{seconds:.0f} s"
    try:
        started = time.monotonic()
        figures["`up -d` returned (dependency conditions met)"] = f"{stack.up():.0f} s"
        stack.wait_until_predicts(coffee_jpeg)
        figures["cold `up -d` to the first Predict answer"] = f"{time.monotonic() - started:.0f} s"
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    else:
        if request.session.testsfailed:
            print(stack.logs())
    finally:
        stack.down()
    # Checked after every test, whatever happened: `down -v` leaves nothing of the project.
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": []}
