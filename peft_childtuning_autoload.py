"""Registers Child-Tuning with peft as soon as peft is imported, so that shared adapters load without
``import peft_childtuning``.

peft has no plugin discovery (its ``PeftType`` enum is closed), so ``PeftModel.from_pretrained(base, repo)`` on a
Child-Tuning adapter fails with ``KeyError: 'CHILDTUNING'`` unless ``peft_childtuning`` was imported first. The
package therefore installs ``peft_childtuning_autoload.pth`` next to itself in site-packages (by ``pip install`` and
``pip install -e``); Python runs its one line at start-up, which calls `install`. That puts a finder at the front of
``sys.meta_path`` that does nothing until ``import peft``: it then lets peft's own loader execute peft and, before
the import returns, imports ``peft_childtuning`` (which registers the tuner, its loaders and its model card) and
takes itself off ``sys.meta_path``. Start-up costs this module only: it imports nothing beyond ``os`` and ``sys``,
which every interpreter has loaded already.

The import lock that Python holds on ``peft`` while executing it makes this run once, and makes other threads that
import peft meanwhile wait until Child-Tuning is registered. When peft is imported from inside a package
peft_childtuning itself imports (``from transformers import Trainer`` imports peft), registering at once would be a
circular import: it then happens at the next import statement once that package has finished executing.

``PEFT_CHILDTUNING_NO_AUTOLOAD=1`` (read when peft is imported) switches the registration off. peft is then left as
it is, except that loading a Child-Tuning adapter raises `ChildTuningNotRegisteredError` (a ``KeyError``, like
peft's own) saying to ``import peft_childtuning`` first. The same error, with the reason as its ``__cause__``, comes
when importing ``peft_childtuning`` fails; a warning says so when peft is imported, and ``import peft`` still works.

Where no code of this package runs, peft's bare ``KeyError`` remains: ``python -S`` (no site-packages processing), a
``pip install --target`` folder put on ``PYTHONPATH`` (not a site directory, so its ``.pth`` files are never read),
or the package not installed at all (the model card of a pushed adapter says to ``pip install peft_childtuning``).
"""

from __future__ import annotations

import os
import sys

PACKAGE = "peft_childtuning"
PEFT_TYPE_NAME = "CHILDTUNING"
DISABLE_VARIABLE = "PEFT_CHILDTUNING_NO_AUTOLOAD"

__all__ = ["ChildTuningNotRegisteredError", "DISABLE_VARIABLE", "install", "is_disabled"]


class ChildTuningNotRegisteredError(KeyError):
    """A Child-Tuning adapter was loaded while Child-Tuning is not registered with peft.

    A ``KeyError``, as peft's own error for an unknown ``peft_type`` is, but printed as the plain message (a
    ``KeyError`` prints the repr of its argument).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def is_disabled() -> bool:
    """Whether ``PEFT_CHILDTUNING_NO_AUTOLOAD`` switches the registration at ``import peft`` off (any value but
    empty, ``0``, ``false``, ``no`` or ``off``)."""
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


class _RegisterAfterLoading:
    """peft's own loader, which imports ``peft_childtuning`` once it has executed peft.

    It stands in ``peft.__spec__.loader`` only while peft executes: peft's own loader is put back then, so nothing of
    this hook stays visible on peft.
    """

    def __init__(self, loader: object, finder: _PeftImportFinder) -> None:
        self.loader = loader
        self.finder = finder

    def create_module(self, spec: object) -> object:
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: object) -> None:
        try:
            self.loader.exec_module(module)
        finally:
            module.__loader__ = self.loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.loader
        self.finder.peft_imported()

    def __getattr__(self, name: str) -> object:  # get_resource_reader, is_package, get_source, ...
        if name == "loader":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


class _PeftImportFinder:
    """A ``sys.meta_path`` finder that answers for ``peft`` only, with the spec the other finders give, whose loader
    registers Child-Tuning once peft has executed. Inert once that is done."""

    def __init__(self) -> None:
        self.done = False

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != "peft" or self.done:
            return None
        finders = list(sys.meta_path)
        for finder in finders[finders.index(self) + 1:] if self in finders else finders:  # those after this one
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if getattr(spec.loader, "exec_module", None) is not None:
                    spec.loader = _RegisterAfterLoading(spec.loader, self)
                return spec
        return None

    def peft_imported(self) -> None:
        if self.done:  # importlib.reload(peft)
            return
        self.done = True
        # a new list, not .remove(): another thread looping over the old one (an import there) misses no finder
        sys.meta_path = [finder for finder in sys.meta_path if finder is not self]
        if _dependency_initializing():
            _register_after_current_imports()
        else:
            _register()


# packages that peft_childtuning imports at import time: peft imported while one of them is still executing (e.g.
# ``from transformers import Trainer``, whose module imports peft) means importing peft_childtuning now would be a
# circular import of a half-initialised module
_DEPENDENCIES = ("transformers", "accelerate", "datasets", "huggingface_hub", "safetensors", "torch")


def _dependency_initializing() -> bool:
    """Whether a module of `_DEPENDENCIES` is executing (importlib marks its spec ``_initializing`` meanwhile)."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.partition(".")[0] in _DEPENDENCIES
    )


def _register_after_current_imports() -> None:
    """Register at the first import statement that returns once no dependency is executing any more (the user's
    next import, e.g. ``from peft import PeftModel``), through a wrapper of ``__import__`` that then removes itself."""
    import builtins

    original = builtins.__import__

    def importing(*args: object, **kwargs: object) -> object:
        module = original(*args, **kwargs)
        if builtins.__import__ is importing and not _dependency_initializing():
            builtins.__import__ = original
            _register()
        return module

    builtins.__import__ = importing


def _register() -> None:
    """Import peft_childtuning (peft is imported); where that is switched off or fails, explain the failed loads.

    Nothing here may make ``import peft`` itself fail: errors become warnings.
    """
    import warnings

    if is_disabled():
        reason = (
            f"its registration when peft is imported is switched off ({DISABLE_VARIABLE}="
            f"{os.environ.get(DISABLE_VARIABLE)!r}): run `import {PACKAGE}` before loading the adapter, or unset "
            f"{DISABLE_VARIABLE}"
        )
        cause = None
    else:
        try:
            __import__(PACKAGE)
            return
        except Exception as error:
            warnings.warn(
                f"{PACKAGE} could not register Child-Tuning with peft when peft was imported "
                f"({type(error).__name__}: {error}); Child-Tuning adapters will not load. `import {PACKAGE}` shows "
                "the full error.",
                RuntimeWarning,
            )
            reason = (
                f"importing {PACKAGE} failed when peft was imported ({type(error).__name__}: {error}); fix that error "
                f"(this one's cause), then `import {PACKAGE}` before loading the adapter"
            )
            cause = error
    try:
        _explain_unregistered(reason, cause)
    except Exception as error:  # a peft whose config lookups moved (the package pins peft <0.22): its KeyError stays
        warnings.warn(f"{PACKAGE}: could not explain unregistered Child-Tuning adapters to peft ({error!r}).",
                      RuntimeWarning)


def _explain_unregistered(reason: str, cause: BaseException | None) -> None:
    """Make peft's two lookups of a saved adapter's type raise `ChildTuningNotRegisteredError` for a Child-Tuning
    adapter while it is not registered, instead of ``KeyError: 'CHILDTUNING'``.

    ``PeftConfig.from_peft_type`` is where ``PeftConfig.from_pretrained`` (``AutoPeftModel*``, transformers'
    ``load_adapter``) looks the type up; ``PeftConfig._get_peft_type`` gives the type that ``PeftModel.from_pretrained``
    and ``load_adapter`` look up next. Both pass through unchanged for every other type, and for Child-Tuning once it
    is registered (e.g. by a later ``import peft_childtuning``).
    """
    from peft.config import PeftConfigMixin
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    def check(peft_type: object) -> None:
        if peft_type == PEFT_TYPE_NAME and peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise ChildTuningNotRegisteredError(
                f"This is a Child-Tuning adapter (peft_type {PEFT_TYPE_NAME!r}), which peft knows only once the "
                f"{PACKAGE} package has registered it, and {reason}."
            ) from cause

    from_peft_type = PeftConfigMixin.from_peft_type.__func__
    get_peft_type = PeftConfigMixin._get_peft_type.__func__

    def checked_from_peft_type(cls: type, **kwargs: object) -> object:
        check(kwargs.get("peft_type"))
        return from_peft_type(cls, **kwargs)

    def checked_get_peft_type(cls: type, model_id: str, **hf_hub_download_kwargs: object) -> object:
        peft_type = get_peft_type(cls, model_id, **hf_hub_download_kwargs)
        check(peft_type)
        return peft_type

    PeftConfigMixin.from_peft_type = classmethod(checked_from_peft_type)
    PeftConfigMixin._get_peft_type = classmethod(checked_get_peft_type)


_finder = _PeftImportFinder()


def install() -> None:
    """Register Child-Tuning when peft is imported (at once if it is already). Run by the ``.pth`` file; idempotent."""
    if _finder.done or _finder in sys.meta_path:
        return
    if "peft" in sys.modules:
        _finder.peft_imported()
    else:
        sys.meta_path.insert(0, _finder)
