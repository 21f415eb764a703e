"""Run every benchmark; each prints absolute figures and ratios against a baseline of the same run."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
for script in sorted(here.glob("bench_*.py")):
    print(f"\n# {script.name}", flush=True)
    subprocess.run([sys.executable, str(script)], check=True)
