"""Skip, or fail in CI, when a service that a test needs is not available.

CI sets ``LPLR_REQUIRE_SERVICES=1`` after starting the services (``.ci/start-services.sh``); a
missing service is then a failure, never a silent skip. On a developer machine it is a skip
that says how to start the service.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

#: Environment variable that turns "service missing" skips into failures.
REQUIRE_SERVICES_ENV = "LPLR_REQUIRE_SERVICES"


def services_required() -> bool:
    """Whether missing services must fail the tests (``LPLR_REQUIRE_SERVICES=1``)."""
    return os.environ.get(REQUIRE_SERVICES_ENV) == "1"


def require_service(reason: str) -> NoReturn:
    """Skip the current test because of `reason`, or fail it when services are required.

    Parameters
    ----------
    reason : str
        What is missing and how to start it, e.g. "sinfo not found; run
        sudo cluster/slurm/start-single-node.sh".
    """
    if services_required():
        pytest.fail(
            f"{reason} ({REQUIRE_SERVICES_ENV}=1: required services must be running; "
            "start them with sudo .ci/start-services.sh)",
            pytrace=False,
        )
    pytest.skip(reason)
