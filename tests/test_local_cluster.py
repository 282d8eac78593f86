"""slurm/local-cluster.sh itself: a daemon that cannot start is reported on the terminal (its log's
tail and the reason), not only in STATE_DIR/log. Needs root and the Slurm packages (`make test`
installs them); only munged is started, and it fails at once."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "local-cluster.sh"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("munged") or not shutil.which("slurmd"),
                    reason="needs root and the Slurm packages (bash tools/system-packages.sh $(bash slurm/local-cluster.sh packages))")
def test_a_daemon_that_fails_to_start_prints_its_log_and_the_reason(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)  # munged refuses a socket that not every user can reach
    home.chmod(0o700)
    state = home / "state"
    env = {**os.environ, "LOCAL_SLURM_ACCOUNTING": "0", "LOCAL_SLURM_TIMEOUT": "10"}
    try:
        out = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True,
                             env=env, timeout=60)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, env=env, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert any(line.startswith("--- tail ") and "munged" in line for line in lines), out.stderr
    assert "munged did not start" in lines[-1] and "execute permissions" in lines[-1], lines[-1]
