"""MindSpore tests run in a pytest process of their own: mindnlp takes over `import torch` for the
whole process, so they cannot share one with the torch tests (ci/test.sh runs them separately)."""

import pytest

from dualtune.backend import get_backend


@pytest.fixture(scope="session")
def ms():
    return get_backend("mindspore", "cpu")
