"""the engine's dask cluster: it leaves dask's configuration as it found it and claims no fixed port."""

from __future__ import annotations

import pytest

import subprocess
import sys


@pytest.mark.slow
def test_a_sweep_leaves_dasks_configuration_as_it_found_it(tmp_path):
    """In a fresh interpreter (distributed not yet imported), entering and leaving the sweep's
    cluster once dropped distributed's configuration: the next sweep in the process failed."""
    script = tmp_path / "twice.py"
    script.write_text(
        "import dask\n"
        "from sherl_pipe.engine import start_cluster\n"
        "if __name__ == '__main__':\n"
        "    for _ in range(2):\n"
        "        with start_cluster(None, workers=1) as eng:\n"
        "            assert eng.workers == 1\n"
        "        assert 'comm' in dask.config.get('distributed')\n"
        "    print('ok')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.slow
def test_a_local_cluster_does_not_claim_dasks_dashboard_port(tmp_path):
    """Two sweeps at once (or a sweep beside another dask cluster): the second's scheduler found
    port 8787 taken and warned "Perhaps you already have a cluster running?"."""
    import socket
    import warnings

    from sherl_pipe.engine import start_cluster

    with socket.socket() as taken:
        try:
            taken.bind(("", 8787))
        except OSError:
            pass  # somebody holds it already: the case under test either way
        taken.listen()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with start_cluster(None, workers=1) as eng:
                assert eng.workers == 1
    assert not [w for w in seen if "8787" in str(w.message)], [str(w.message) for w in seen]
