"""Loading the project's scripts (examples/, benchmarks/) as modules in tests: they are not
part of the package, so they are imported from their files, once per test session."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str, name: str):
    """The script at ``relative_path`` (from the project root) as module ``name``; a later call
    with the same name returns the module already loaded."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
