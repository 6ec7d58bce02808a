"""Build hook: generate the gRPC stubs from proto/ (see service/grpc_codegen.py).

Everything else about the package is in pyproject.toml. ``build_py`` runs for a wheel
build and for ``pip install -e .`` (setuptools' editable install runs it too), so the
stubs in ``service/proto_gen/`` always match the .proto files and are never committed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# The layer folders keep their place in the tree and install inside the one ecgx namespace.
NESTED = {"ecgx.service": "service", "ecgx.training": "training", "ecgx.validation": "validation"}


def _packages() -> list[str]:
    packages = ["ecgx", *(f"ecgx.{p}" for p in find_packages(str(HERE / "ecgx")))]
    for name, folder in NESTED.items():
        packages += [name, *(f"{name}.{p}" for p in find_packages(str(HERE / folder)))]
    return packages


def _codegen():
    spec = importlib.util.spec_from_file_location("_ecgx_grpc_codegen", HERE / "service" / "grpc_codegen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        codegen = _codegen()
        codegen.generate()
        # Package discovery ran before the stubs existed: add their packages.
        found = sorted(
            ".".join(("ecgx", *p.parent.relative_to(HERE).parts))
            for p in codegen.OUT_DIR.rglob("__init__.py")
        )
        self.packages = list(self.packages or []) + [p for p in found if p not in (self.packages or [])]
        super().run()


setup(packages=_packages(), package_dir=NESTED, cmdclass={"build_py": BuildPyWithStubs})
