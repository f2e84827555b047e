"""Build a folder of wheels that installs megamlm into a Python with no network (``tools/setup.sh --wheels``).

    python tools/wheels.py DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64] [--extras mpi,finetune]

Compute clusters often reach no package index, and their Python already has a CUDA build of torch (the
site's, matched to its driver). This writes to DIR megamlm's own wheel and, at the versions installed in
the environment running it, every distribution megamlm needs besides torch (and what only torch needs):
DeepSpeed, webdataset, sentencepiece, tensorboard, ... with their dependencies. Binary wheels are fetched
for the target interpreter and platform (``pip download --only-binary``); a package that ships only a
source archive (DeepSpeed) is built here into a pure wheel (``pip wheel``; its CUDA ops are compiled at
first use on the target, as DeepSpeed does by default). ``DIR/requirements.txt`` lists what was gathered.

Run it where a package index is reachable, in megamlm's environment (tools/setup.sh makes one); carry DIR
to the cluster and run ``tools/setup.sh --wheels DIR`` there.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch and what only torch pulls in: the target's own CUDA build provides them
TORCH_ONLY = {"torch", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], extras: set[str]) -> dict[str, str]:
    """{distribution: installed version} of everything ``roots`` need (their extras in ``extras``), torch's
    own dependencies left out; read from the installed metadata (markers evaluated for this interpreter)."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = [(r, extras) for r in roots]
    while todo:
        name, want = todo.pop()
        key = _norm(name)
        if key in seen or key in TORCH_ONLY:
            continue
        dist = metadata.distribution(name)
        seen[key] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in want | {""}):
                todo.append((req.name, set(req.extras)))
    seen.pop("megamlm", None)
    return dict(sorted(seen.items()))


def build(out: Path, python_version: str, platforms: list[str], extras: set[str]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(out), str(ROOT)], check=True)
    pins = [f"{n}=={v}" for n, v in closure(["megamlm"], extras).items()]
    plat = [a for p in platforms for a in ("--platform", p)]
    for pin in pins:
        got = subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                                    "--implementation", "cp", *plat, "--platform", "any", "-d", str(out), pin],
                             capture_output=True, text=True)
        if got.returncode:  # a source archive only (DeepSpeed): build a pure wheel here
            subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(out), pin], check=True)
    (out / "requirements.txt").write_text("\n".join(pins) + "\n")
    return pins


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write the wheels to")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the target interpreter (default: this one)")
    p.add_argument("--platform", action="append", default=None,
                   help="target platform tags (default: manylinux 2014, 2_17 and 2_28 for this machine's arch)")
    p.add_argument("--extras", default="", help="megamlm extras to include, e.g. mpi,finetune")
    a = p.parse_args(argv)
    import platform

    arch = platform.machine()
    platforms = a.platform or [f"manylinux2014_{arch}", f"manylinux_2_17_{arch}", f"manylinux_2_28_{arch}"]
    pins = build(a.out, a.python_version, platforms, {e for e in a.extras.split(",") if e})
    print(f"{len(pins) + 1} distributions in {a.out} for Python {a.python_version} ({', '.join(platforms)}): "
          f"megamlm and {', '.join(p.split('==')[0] for p in pins)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
