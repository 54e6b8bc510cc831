"""Make the stock `lm_eval --model olmoe_bh` work on lm-eval 0.4.13, which has no plugin discovery.

Installed as a top-level module and imported by `lm_eval_bh.pth` at interpreter start-up. It only
adds a meta-path finder, so processes that never import lm-eval pay nothing. When
`lm_eval.api.registry` is first imported, it registers lm-eval's own models (so `--model hf` keeps
working), then lm-eval-bh's models as lazy "module:Class" entries, and makes lm-eval-bh's argument
errors print as one line instead of a traceback. It must never raise.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "lm_eval.api.registry"
_MODELS = {"olmoe_bh": "lm_eval_bh.lm:OlmoeBHLM", "moe_bh": "lm_eval_bh.lm:MoEBHLM"}


def _register(registry) -> None:
    try:
        import lm_eval.models  # noqa: F401  (lm-eval's own lazy entries; an empty registry would skip them)

        for name, target in _MODELS.items():
            if name not in registry.model_registry:
                registry.model_registry.register(name, target=target)
        _install_excepthook()
    except Exception:  # a broken plugin must never break lm-eval
        pass


def _install_excepthook() -> None:
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        if any(c.__name__ == "RoutingError" and c.__module__.startswith("lm_eval_bh") for c in exc_type.__mro__):
            print(f"error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    sys.excepthook = excepthook


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        try:
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec
        except Exception:
            return None


if not any(isinstance(f, _Finder) for f in sys.meta_path) and _TARGET not in sys.modules:
    sys.meta_path.insert(0, _Finder())
