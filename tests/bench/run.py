"""`make bench`: run every benchmark in its own process and print all figures as one final JSON line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHES = ["clearing", "inference", "leasing", "gateway", "e2e", "api", "tolerance", "verification", "batches", "workloads"]


def main() -> None:
    figures = {}
    for name in BENCHES:
        out = subprocess.run([sys.executable, "-m", f"tests.bench.{name}"], cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stdout[-2000:] + out.stderr[-4000:])
            figures[name] = {"error": f"exit {out.returncode}"}
            continue
        figures[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(figures[name])}", flush=True)
    print(json.dumps(figures))
    if any("error" in f for f in figures.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
