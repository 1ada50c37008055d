"""Create the project venv so that it sees every package the creating interpreter sees.

``python -m venv --system-site-packages`` links a new venv to the *base* installation only. When the
creating interpreter is itself a venv (as on the GPU machines, whose python3 is a venv holding torch,
triton and pytest), its packages would be invisible and the Makefile would try to download them on a
machine without network. A ``.pth`` file in the new venv adds the creator's site-packages after the
venv's own, so nothing already present is installed again.
"""

import site
import subprocess
import sys
import sysconfig
from pathlib import Path


def main(target: str) -> int:
    status = subprocess.call([sys.executable, "-m", "venv", "--system-site-packages", target])
    if status or sys.prefix == sys.base_prefix:
        return status
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    venv_python = Path(target) / "bin" / "python"
    venv_site = subprocess.check_output([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip()
    (Path(venv_site) / "_hdlm_parent_env.pth").write_text("\n".join(parents) + "\n")
    print(f"{target} also sees the packages of {sys.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
