"""Test-only: this interpreter "sees" an NVIDIA GPU. On a subprocess's PYTHONPATH only in tests
(tests/standins); patches wanda.export.engine.nvidia_gpu_visible once that module is imported,
without importing anything itself (so interpreters that never load wanda pay nothing)."""
import importlib.abc
import sys

TARGET = "wanda.export.engine"


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                exec_module = spec.loader.exec_module

                def patched(module, _exec=exec_module):
                    _exec(module)
                    module.nvidia_gpu_visible = lambda: True

                spec.loader.exec_module = patched
                return spec
        return None


sys.meta_path.insert(0, _PatchAfterImport())
