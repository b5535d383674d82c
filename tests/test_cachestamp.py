"""The Numba cache stamps (runtime/kernels/cachestamp.py): CALLS is the kernels' real call graph
across files, a kernel file's stamp changes exactly when a file its kernels reach changes, and
drop_stale deletes the cache entries of those kernel files only."""

import importlib
import os
import pkgutil
import shutil
import types

import numba
import pytest
from numba.core.caching import NullCache
from numba.core.dispatcher import Dispatcher
from numba.extending import _Intrinsic

import edgellm.runtime
from edgellm.runtime.kernels import cachestamp

KERNELS = "edgellm.runtime.kernels."
CHOICES = "vnni=True,vbmi2=True,avx512=True"


def _origin(obj):
    """The module that defines a compiled callable (a jitted function or an intrinsic)."""
    if isinstance(obj, Dispatcher):
        return obj.py_func.__module__
    if isinstance(obj, _Intrinsic):
        return obj._defn.__module__
    return None


def _references(fn):
    """Compiled callables fn's code names: globals, attributes of modules, closure cells."""
    out, g = [], fn.__globals__

    def walk(code):
        for n in code.co_names:
            v = g.get(n)
            if isinstance(v, types.ModuleType):
                out.extend(getattr(v, a, None) for a in code.co_names)
            else:
                out.append(v)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                walk(c)

    walk(fn.__code__)
    for cell in fn.__closure__ or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return [o for o in out if _origin(o)]


def compiled_functions():
    """Every jitted function of edgellm.runtime: module-level ones and those they call."""
    seen, todo = {}, []
    for m in pkgutil.walk_packages(edgellm.runtime.__path__, "edgellm.runtime."):
        mod = importlib.import_module(m.name)
        todo.extend(v for v in vars(mod).values() if isinstance(v, Dispatcher))
    while todo:
        d = todo.pop()
        if id(d) not in seen:
            seen[id(d)] = d
            todo.extend(o for o in _references(d.py_func) if isinstance(o, Dispatcher))
    return list(seen.values())


@pytest.fixture(scope="module")
def calls():
    """{module: set of other modules its compiled functions call}, from the functions' code."""
    out = {}
    for d in compiled_functions():
        mod = d.py_func.__module__
        for o in _references(d.py_func):
            if _origin(o) != mod:
                out.setdefault(mod, set()).add(_origin(o))
    return out


def test_calls_is_the_call_graph_of_the_compiled_kernels(calls):
    found = {m[len(KERNELS):]: {c[len(KERNELS):] for c in cs}
             for m, cs in calls.items() if m.startswith(KERNELS)}
    assert found == {m: set(cs) for m, cs in cachestamp.CALLS.items()}, \
        "a kernel file calls another one: add the call to cachestamp.CALLS"
    # a cached function outside the kernels' folder would keep its cache elsewhere: none calls in
    outside = {m: cs for m, cs in calls.items() if not m.startswith(KERNELS)
               and any(c.startswith(KERNELS) for c in cs)}
    assert not outside


def test_every_kernel_file_with_cached_kernels_is_seen():
    """The graph above is built from module-level jitted functions: the cached ones it finds
    cover every kernel file that holds cache=True (so none hides in a factory)."""
    cached = {d.py_func.__module__[len(KERNELS):] for d in compiled_functions()
              if d.py_func.__module__.startswith(KERNELS) and not isinstance(d._cache, NullCache)}
    here = os.path.dirname(cachestamp.__file__)
    declared = {f[:-3] for f in os.listdir(here) if f.endswith(".py")
                and "cache=True" in open(os.path.join(here, f)).read()}
    assert cached == declared - {"cachestamp"}


@pytest.fixture
def folder(tmp_path):
    """A copy of the kernel files to edit."""
    here = os.path.dirname(cachestamp.__file__)
    d = tmp_path / "kernels"
    d.mkdir()
    for f in os.listdir(here):
        if f.endswith(".py"):
            shutil.copy(os.path.join(here, f), d / f)
    return d


def _edit(folder, name):
    with open(folder / f"{name}.py", "a") as f:
        f.write("\n# an edit\n")


@pytest.mark.parametrize("edited", ["simd", "sparse", "sparse_simd", "ffn", "matvec", "fused",
                                    "tiles", "reference"])
def test_a_stamp_changes_exactly_when_a_file_its_kernels_reach_changes(folder, calls, edited):
    graph = {m[len(KERNELS):]: {c[len(KERNELS):] for c in cs} for m, cs in calls.items()
             if m.startswith(KERNELS)}
    before = cachestamp.stamps(CHOICES, str(folder))
    assert cachestamp.stamps(CHOICES, str(folder)) == before  # the same files, the same stamps
    _edit(folder, edited)
    after = cachestamp.stamps(CHOICES, str(folder))
    changed = {n for n in before if before[n] != after[n]}
    # the files reaching it through the graph read from the compiled code, not through CALLS
    assert changed == {n for n in before if edited in cachestamp.reached(n, graph)}
    if edited == "simd":  # nearly every kernel inlines simd.py's intrinsics
        assert {"fused", "ffn", "qmatvec", "sparse", "attention"} <= changed
    if edited in ("tiles", "reference"):  # called by no other kernel file
        assert not changed
    if edited == "fused":  # called by team.py's kernels only
        assert changed == {"team"}


def test_a_change_of_cpu_choices_changes_every_stamp(folder):
    a = cachestamp.stamps(CHOICES, str(folder))
    b = cachestamp.stamps(CHOICES.replace("vnni=True", "vnni=False"), str(folder))
    assert all(a[n] != b[n] for n in a)


def test_drop_stale_deletes_the_entries_of_the_kernels_that_reach_an_edited_file(folder,
                                                                                   tmp_path):
    cache = tmp_path / "cache"
    entries = ["fused.decode_layer-94.py311.nbi", "fused.decode_layer-94.py311.1.nbc",
               "ffn.ffn_rows-12.py311.nbi", "sparse.sp_ffn-40.py311.nbi",
               "norms.rmsnorm-9.py311.nbi", "other.f-1.py311.nbi"]

    def fill():
        cache.mkdir(exist_ok=True)
        for e in entries:
            (cache / e).write_bytes(b"x")

    def left():
        return sorted(p for p in os.listdir(cache) if p.endswith((".nbi", ".nbc")))

    fill()
    assert set(cachestamp.drop_stale(CHOICES, str(folder), str(cache))) >= {"fused", "ffn"}
    assert left() == ["other.f-1.py311.nbi"]  # no stamps yet: every kernel file's entries
    fill()
    assert cachestamp.drop_stale(CHOICES, str(folder), str(cache)) == []
    assert left() == sorted(entries)  # nothing changed: nothing dropped
    _edit(folder, "sparse_simd")  # reached by sparse.py's kernels and, through them, fused's
    # and team's
    assert sorted(cachestamp.drop_stale(CHOICES, str(folder), str(cache))) == ["fused", "sparse",
                                                                               "team"]
    assert left() == sorted(["ffn.ffn_rows-12.py311.nbi", "norms.rmsnorm-9.py311.nbi",
                             "other.f-1.py311.nbi"])
    assert cachestamp.drop_stale(CHOICES, str(folder), str(cache)) == []


def test_the_package_cache_is_stamped():
    """Importing the kernels checked the stamps: the file is there, with the current stamps."""
    import json

    from edgellm.runtime.kernels import simd

    if numba.config.DISABLE_JIT:
        pytest.skip("no cache without the JIT")
    path = os.path.join(cachestamp.cache_dir(), cachestamp.STAMPS)
    if not os.access(os.path.dirname(path), os.W_OK):
        pytest.skip("a read-only install keeps no stamps")
    choices = f"vnni={simd.HAVE_VNNI},vbmi2={simd.HAVE_VBMI2},avx512={simd.HAVE_AVX512}"
    with open(path) as f:
        assert json.load(f) == cachestamp.stamps(choices)


@pytest.mark.parametrize("own", [False, True])
def test_cache_dir_is_where_numba_caches_the_kernels(own, tmp_path, monkeypatch):
    """With and without NUMBA_CACHE_DIR: a cached kernel made now is located where
    drop_stale looks."""
    from edgellm.runtime.kernels import norms

    if numba.config.DISABLE_JIT:
        pytest.skip("no cache without the JIT")
    if own:
        monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "numba-cache"))
    elif not os.access(os.path.dirname(cachestamp.__file__), os.W_OK):
        pytest.skip("a read-only install: Numba caches in the user's folder, never stale")
    fresh = numba.njit(cache=True)(norms.rmsnorm.py_func)
    assert os.path.realpath(fresh._cache._cache_path) == os.path.realpath(cachestamp.cache_dir())
