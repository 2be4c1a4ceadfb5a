"""scripts/train_torch.py, the DDP x spatial-shards example, for a few steps:
every layout (1x1, 2x1, 1x2, 2x2 ranks over gloo) gives the same loss at
every step, as the global batch's mean loss on one process does."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (python3-sklearn)")


def test_layouts_agree(tmp_path):
    out = tmp_path / "layouts.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train_torch.py"), "--layouts", "1x1,2x1,1x2,2x2",
           "--steps", "3", "--dtype", "float64", "--timeout", "120", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # the script's own limit is shorter
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert [(r["dp"], r["sp"]) for r in results] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    ref = results[0]["step_losses"]
    assert len(ref) == 3 and len(set(ref)) == 3, ref  # three steps, each on its own batch and weights
    for r in results:
        assert len(r["step_losses"]) == 3
        # float64: the layouts differ in the order of sums only
        for a, b in zip(r["step_losses"], ref):
            assert abs(a - b) <= 1e-10 * abs(b), (r["dp"], r["sp"], r["step_losses"], ref)
    print("\n" + run.stdout)
