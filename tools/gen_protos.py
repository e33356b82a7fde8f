"""Regenerate the committed gRPC/protobuf code under protos/ from the .proto sources.

Run from anywhere: ``python -m aigis.tools.gen_protos`` (``make protos``). ``--check`` compares instead of
writing, so a test can fail when the committed code is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """Every .proto source, relative to protos/ (so imports come out as the proto package: aigis.x.v1)."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto into out_dir; return the generated files relative to out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(PROTO_ROOT / p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def committed() -> list[Path]:
    return sorted(
        p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)
    )


def stale_files() -> list[str]:
    """Generated files that differ from, are missing from, or are extra in the committed tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        problems = [str(p) for p in fresh if not (PROTO_ROOT / p).exists()
                    or not filecmp.cmp(Path(tmp) / p, PROTO_ROOT / p, shallow=False)]
        problems += [f"{p} (no longer generated)" for p in set(committed()) - set(fresh)]
        return sorted(problems)


def write() -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        for p in set(committed()) - set(fresh):
            (PROTO_ROOT / p).unlink()
        for p in fresh:
            shutil.copyfile(Path(tmp) / p, PROTO_ROOT / p)
    # protoc writes no __init__.py; the generated modules import each other by package path.
    for directory in {(PROTO_ROOT / p).parent for p in fresh}:
        while directory != PROTO_ROOT:
            (directory / "__init__.py").touch()
            directory = directory.parent
    return fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_files()
        for p in problems:
            print(f"stale: {p}", file=sys.stderr)
        return 1 if problems else 0
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
