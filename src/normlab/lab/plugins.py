"""Plugins: your own norms, models, datasets and experiments, seen by the ``normlab`` command.

A plugin is a Python module that registers things when it is imported, with
:func:`normlab.register_norm`, :func:`normlab.lab.models.register_model`,
:func:`normlab.lab.data.register_dataset` and
:func:`normlab.lab.experiments.register_experiment`. The command loads it in
one of two ways:

* ``normlab --import my_module COMMAND ...`` (repeatable): imports the module
  by name, from the current folder or anywhere on ``sys.path`` (a file
  ``my_norms.py`` here is ``--import my_norms``);
* an installed package that declares an entry point in the group
  ``normlab.plugins`` (in its ``pyproject.toml``)::

      [project.entry-points."normlab.plugins"]
      my_norms = "my_package.normlab_plugin"      # a module: imported
      my_setup = "my_package.plugin:register"     # a callable: imported, then called with no arguments

Entry points are loaded before any command runs, and also by the experiment
registry before its first look-up, so Python code and the workers of
``--executor local`` / ``ray`` see them too. Modules given with ``--import``
are passed on to child processes (``--nproc``, ``--executor local``) in the
environment variable ``NORMLAB_IMPORT`` (comma-separated module names). A
plugin that fails to import is a :class:`PluginError` naming it (the command:
one line, exit status 2).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import types
from collections.abc import Iterable

__all__ = ["GROUP", "ENV_VAR", "PluginError", "load_plugins", "import_modules", "load_entry_points"]

GROUP = "normlab.plugins"
ENV_VAR = "NORMLAB_IMPORT"

_loaded_entry_points: set[tuple[str, str]] = set()


class PluginError(Exception):
    """A plugin module or entry point could not be loaded (the message names it and says what to check)."""


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def load_entry_points() -> list[str]:
    """Load every ``normlab.plugins`` entry point not loaded yet; return their names."""
    done = []
    for ep in importlib.metadata.entry_points(group=GROUP):
        key = (ep.name, ep.value)
        if key in _loaded_entry_points:
            continue
        _loaded_entry_points.add(key)
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, types.ModuleType):
                obj()
        except Exception as e:
            dist = getattr(getattr(ep, "dist", None), "name", None) or "the package that declares it"
            raise PluginError(
                f"plugin {ep.name!r} (entry point {ep.value!r} in group {GROUP!r}) failed to load: {_one_line(e)}; "
                f"fix or uninstall {dist}"
            ) from e
        done.append(ep.name)
    return done


def import_modules(names: Iterable[str]) -> list[str]:
    """Import the modules ``names`` (the current folder first on ``sys.path``); record them in ``NORMLAB_IMPORT``."""
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        return []
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for name in names:
        if name.endswith(".py") or os.sep in name:
            raise PluginError(
                f"--import {name}: give a module name, not a file (for {name!r}: --import "
                f"{os.path.splitext(os.path.basename(name))[0]}, run from its folder or with it on PYTHONPATH)"
            )
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                raise PluginError(
                    f"--import {name}: no module named {e.name!r} in the current folder ({cwd}) or on sys.path; "
                    "a file my_norms.py is imported as --import my_norms"
                ) from e
            raise PluginError(f"--import {name}: importing it failed: {_one_line(e)}") from e
        except Exception as e:
            raise PluginError(f"--import {name}: importing it failed: {_one_line(e)}") from e
    known = [n for n in os.environ.get(ENV_VAR, "").split(",") if n]
    os.environ[ENV_VAR] = ",".join(dict.fromkeys([*known, *names]))
    return names


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Load the entry-point plugins, the modules named in ``NORMLAB_IMPORT``, then ``modules``."""
    load_entry_points()
    import_modules([*os.environ.get(ENV_VAR, "").split(","), *modules])
