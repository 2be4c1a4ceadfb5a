"""distgn.torch with an mpi4py communicator as the process group: 4 ranks under mpirun."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest


def test_four_ranks_under_mpirun():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (scripts/setup.sh --python installs it)")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun is not installed")
    worker = pathlib.Path(__file__).with_name("mpi4py_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([mpirun, "-np", "4", "--oversubscribe", "--allow-run-as-root", sys.executable, str(worker)],
                         capture_output=True, text=True, timeout=300, env=env)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    # mpirun may join the ranks' lines: look for each rank's PASS anywhere
    assert sorted(re.findall(r"PASS rank (\d+):", run.stdout)) == [str(r) for r in range(4)], run.stdout
