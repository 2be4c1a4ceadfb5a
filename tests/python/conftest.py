# pytest configuration of the Python tests (tests/python): distgn.torch
# against torch.nn.GroupNorm, gradcheck, and multi-process runs over gloo.
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (scripts/setup.sh --python installs it)")


def pytest_report_header(config):
    return f"torch {torch.__version__}"
