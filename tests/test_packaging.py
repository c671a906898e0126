"""What `pip install` gives a user: one package named splitmq, the files its commands need, and a
command line that starts without torch."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import ROOT


def test_a_wheel_installs_one_package_named_splitmq_that_works_without_the_checkout(tmp_path: Path) -> None:
    # Given the wheel built from this checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, timeout=600, capture_output=True)
    wheel = next(tmp_path.glob("splitmq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    # Then nothing but splitmq lands at the top of site-packages, and the broker config and deploy files come along
    assert {n.split("/")[0] for n in names} == {"splitmq", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "splitmq/broker_config/rabbitmq.conf" in names and "splitmq/deploy/broker.sh" in names
    # When it is installed into an empty virtualenv (with the small dependencies, not torch)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=300, capture_output=True)
    subprocess.run([*pip, "pika", "msgpack", "prometheus-client"], check=True, timeout=600, capture_output=True)
    python = str(venv / "bin" / "python")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # Then `import splitmq` works, `import shared` does not, and the commands that need no model run without torch
    assert run(python, "-c", "import splitmq, sys; print(splitmq.__version__, 'torch' in sys.modules)").stdout.split() \
        == ["0.2.0", "False"]
    assert run(python, "-c", "import shared").returncode != 0
    assert run(str(venv / "bin" / "splitmq"), "--help").returncode == 0
    definitions = run(str(venv / "bin" / "splitmq"), "broker", "definitions")
    assert definitions.returncode == 0 and '"splitmq.mnist.forward.top"' in definitions.stdout
