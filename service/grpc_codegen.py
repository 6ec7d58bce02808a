"""Python stubs of the gRPC API (proto/) into ``service/proto_gen/`` (git-ignored).

``setup.py`` runs :func:`generate` whenever the package is built or installed (a wheel
build or ``pip install -e .``), so the stubs always match proto/ and nobody edits or
commits them. After editing a .proto in a checkout, regenerate without reinstalling:

    python -m ecgx.service.grpc_codegen

Standard library and ``grpc_tools`` only: setup.py loads this file by path inside pip's
isolated build environment, where neither numpy nor this package is importable.

protoc writes imports rooted at the proto folder (``from ecgx.v1 import ecgx_pb2``), which
would collide with the ``ecgx`` command-line package; they are rewritten to
``ecgx.service.proto_gen.ecgx.v1``. The descriptors keep their proto paths
(``ecgx/v1/ecgx.proto``), so server reflection and other languages see the files as written.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "service" / "proto_gen"
PACKAGE = "ecgx.service.proto_gen"


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    return sorted(proto_dir.rglob("*.proto"))


def generate(proto_dir: Path = PROTO_DIR, out_dir: Path = OUT_DIR, package: str = PACKAGE) -> list[Path]:
    """Run protoc (grpcio-tools) on every .proto under ``proto_dir``; returns the files written.

    The output is built in a sibling folder and swapped in, so a failed run leaves the previous
    stubs in place.
    """
    import shutil
    import tempfile

    from grpc_tools import protoc

    try:  # grpc_tools ships the well-known types (google/protobuf/*.proto)
        from importlib.resources import files

        include = str(files("grpc_tools") / "_proto")
    except (ImportError, TypeError):  # pragma: no cover
        include = None
    protos = proto_files(proto_dir)
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".proto_gen.", dir=out_dir.parent))
    try:
        args = ["grpc_tools.protoc", f"-I{proto_dir}"]
        if include:
            args.append(f"-I{include}")
        args += [f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [str(p) for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(map(str, protos))}")
        roots = {p.relative_to(proto_dir).parts[0] for p in protos}
        alternatives = "|".join(map(re.escape, sorted(roots)))
        pattern = re.compile(r"^(from|import) (" + alternatives + r")(\.|\s)", re.M)
        for path in sorted(tmp.rglob("*")):
            if path.suffix in (".py", ".pyi"):
                text = pattern.sub(lambda m: f"{m[1]} {package}.{m[2]}{m[3]}", path.read_text())
                path.write_text(text)
        for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from proto/ by service/grpc_codegen.py; do not edit."""\n')
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return sorted(out_dir.rglob("*.py*"))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    written = generate()
    print(f"wrote {len(written)} files under {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
