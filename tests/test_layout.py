"""The library stands alone: ``import normlab`` and every library module load nothing from ``normlab.lab``
and need none of the ``lab`` extra's packages."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import normlab

LAB_ONLY = ("sklearn", "matplotlib", "mnist1d", "tqdm", "pandas", "scipy", "ray")


def _library_modules() -> list[str]:
    root = Path(normlab.__file__).parent
    names = []
    for info in pkgutil.walk_packages([str(root)], prefix="normlab."):
        if info.name == "normlab.lab" or info.name.startswith("normlab.lab.") or info.name == "normlab.__main__":
            continue
        names.append(info.name)
    return sorted(names)


def test_library_modules_import_without_the_lab_or_its_packages():
    modules = _library_modules()
    assert "normlab.functional" in modules and "normlab.registry" in modules and len(modules) > 10
    code = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys

        BLOCKED = {LAB_ONLY!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is a lab package; the library must not need it")
                return None

        sys.meta_path.insert(0, Block())
        import normlab
        for name in {modules!r}:
            importlib.import_module(name)
        lab = sorted(m for m in sys.modules if m == "normlab.lab" or m.startswith("normlab.lab."))
        assert not lab, lab
        print("ok", len({modules!r}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
