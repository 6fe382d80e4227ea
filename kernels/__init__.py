"""Triton kernels, installed as medvl.kernels. Import needs triton; medvl.ops imports these lazily.

This folder sits at the top of the repository, and the repository root is on ``sys.path`` whenever
Python runs from it (``python -m``, pytest) and, through the editable install's ``.pth`` file, in
every interpreter of the project's venv. Under any name but ``medvl.kernels`` it would therefore
shadow the PyPI package ``kernels`` (which transformers >= 5.2x imports). So under any other name it
steps aside: the import resolves to the installed package of that name, found on ``sys.path``
without the repository root, or fails as if this folder were not there.
"""

if __name__ != "medvl.kernels":
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root]
    _spec = _PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {__name__!r}: the folder {_os.path.dirname(_os.path.realpath(__file__))} is "
            f"medvl's Triton kernels, importable only as medvl.kernels", name=__name__)
    _module = _module_from_spec(_spec)
    # importlib returns what sys.modules holds after this file ran: the installed package.
    _sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
