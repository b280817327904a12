"""Builds the oneDNN convolution library that `jaxprune.ops.onednn` loads.

The library is C++ against two system pieces that a wheel cannot carry: oneDNN
(``apt-get install libdnnl-dev``, Debian 12 ships 2.6.3) and the XLA FFI headers of the
installed jaxlib. So it is compiled on the machine, once, by ``scripts/install.sh`` or by hand:

    python -m jaxprune.ops.onednn_build          # writes jaxprune/ops/libjaxprune_onednn.so

A failed build changes nothing: without the library, convolutions keep XLA's own lowering.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "onednn_conv.cc"
# Inside the package so an editable install finds it; ignored by git. JAXPRUNE_ONEDNN_LIBRARY
# names another place (a build elsewhere, or none: a path that does not exist).
LIBRARY = Path(os.environ.get("JAXPRUNE_ONEDNN_LIBRARY") or HERE / "libjaxprune_onednn.so")
BUILD_COMMAND = "python -m jaxprune.ops.onednn_build"


class BuildError(RuntimeError):
    """The compiler, the oneDNN headers or the jaxlib FFI headers are missing, or g++ failed."""


def compiler() -> str:
    """The C++ compiler to use: ``$CXX`` or ``g++``."""
    return os.environ.get("CXX", "g++")


def compile_command(output: Path) -> list[str]:
    """The compiler command line that builds the library into `output`.

    Args:
      output: where the shared object goes.

    Returns:
      The argv list (``-isystem`` for the jaxlib headers, so their warnings stay quiet).
    """
    import jax.ffi

    return [
        compiler(),
        "-O3",
        "-shared",
        "-fPIC",
        "-std=c++17",
        "-fopenmp",
        "-isystem",
        str(jax.ffi.include_dir()),
        str(SOURCE),
        "-o",
        str(output),
        "-ldnnl",
    ]


def is_stale(library: Path = LIBRARY) -> bool:
    """Whether `library` is missing or older than its source."""
    if not library.exists():
        return True
    # An install without the source (a wheel) has only the library to go by.
    return SOURCE.exists() and library.stat().st_mtime < SOURCE.stat().st_mtime


def build(force: bool = False, library: Path = LIBRARY) -> Path:
    """Compiles the library unless an up-to-date one exists.

    The shared object is written next to its final place and renamed over it, so a process
    that has the old one loaded keeps a valid mapping.

    Args:
      force: compile even when the library is newer than its source.
      library: where to put it.

    Returns:
      The library's path.

    Raises:
      BuildError: the compiler is missing or the compilation failed (its output is in the
        message).
    """
    if not force and not is_stale(library):
        return library
    if shutil.which(compiler()) is None:
        raise BuildError(f"no C++ compiler {compiler()!r} (apt-get install g++)")
    fd, tmp_name = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        command = compile_command(tmp)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(
                f"{shlex.join(command)} failed (is libdnnl-dev installed?):\n{done.stderr}"
            )
        tmp.chmod(0o755)
        tmp.replace(library)
    finally:
        tmp.unlink(missing_ok=True)
    return library


def main(argv: list[str] | None = None) -> int:
    """Command line: builds the library; exit status 1 (and a message) when it cannot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    if not args.force and not is_stale():
        print(f"{LIBRARY} is up to date")
        return 0
    try:
        path = build(force=args.force)
    except BuildError as err:
        print(f"oneDNN convolutions not built: {err}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
