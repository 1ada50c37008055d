"""Install, with pip, only those of the named distributions that are not importable already.

Used by the Makefile so that an offline machine with the packages preinstalled never reaches
for the network, while a fresh machine gets what it lacks. Names are pip distribution names;
the import name is derived for the few that differ.
"""

import importlib.util
import subprocess
import sys

IMPORT_NAMES = {"pytest-benchmark": "pytest_benchmark", "pybind11": "pybind11"}


def main(names: list[str]) -> int:
    missing = [n for n in names if importlib.util.find_spec(IMPORT_NAMES.get(n, n).replace("-", "_")) is None]
    if not missing:
        return 0
    print("installing missing packages:", " ".join(missing), flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", *missing])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
