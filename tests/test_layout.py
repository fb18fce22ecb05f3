"""The code stays readable in one sitting: no package module over 400 lines, no function (nested ones
counted within their parent, decorators included) over 80 lines in the package, the entry scripts or
the benchmarks, imports at the top of modules except the heavy optional ones listed here, and no
benchmark importing another (what they share lives in the package or in benchmarks/common.py)."""
import ast
import re
import functools
import gc
from pathlib import Path

from conftest import REPO

PACKAGE = sorted((REPO / 'imagenet_ffcv').glob('*.py'))
ENTRY_SCRIPTS = [REPO / name for name in ('train_imagenet.py', 'write_beton.py', 'predict.py')]
BENCHMARKS = sorted((REPO / 'benchmarks').glob('*.py'))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80
# Imports that stay inside a function: heavy, and only that function needs them.
LATE_IMPORTS_ALLOWED = {('ilsvrc.py', 'scipy.io'), ('metrics.py', 'matplotlib'),
                        ('metrics.py', 'matplotlib.pyplot')}
# The packages a config may do without (timm, wandb, TensorBoard) are imported through
# optional.require only, when asked for.


@functools.lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    """``ast.parse`` of the file. CPython 3.11 keeps the AST constructor's recursion count in
    process-wide state (python/cpython#106905), so another thread using it at the same moment, or
    a finalizer run by the garbage collector mid-parse, can make a correct parse raise SystemError
    "AST constructor recursion depth mismatch" (in CI, with loader threads of earlier tests still
    alive): the collector is off while parsing, and that one error is retried."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        for attempt in range(3):
            try:
                return ast.parse(path.read_text())
            except SystemError as e:
                if 'recursion depth mismatch' not in str(e) or attempt == 2:
                    raise
    finally:
        if enabled:
            gc.enable()


def functions(path: Path):
    tree = parse(path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def imported_modules(node) -> list:
    """The modules that an absolute import statement names (``import a.b``, ``from a.b import
    c``: 'a.b'); [] for a relative import or any other node."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module]
    return []


def function_lines(node) -> int:
    first = min([d.lineno for d in node.decorator_list] + [node.lineno])
    return node.end_lineno - first + 1


def test_no_module_over_400_lines():
    long = {p.name: n for p in PACKAGE if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_over_80_lines():
    long = [f'{p.name}:{node.lineno} {node.name} ({function_lines(node)} lines)'
            for p in PACKAGE + ENTRY_SCRIPTS + BENCHMARKS for node in functions(p)
            if function_lines(node) > MAX_FUNCTION_LINES]
    assert long == []


def test_the_package_raises_its_own_errors_not_bare_built_in_ones():
    """Each error the package raises for bad input or a missing file is one of its own
    (errors.ImagenetFfcvError, and the built-in type a caller expects): the commands tell those
    in one line (commands.is_user_error) and keep a traceback for the rest, the code's defects.
    A bare FileNotFoundError (a mistyped --config, a missing .beton) gave the trainer's traceback.
    The bare raises left: fastargs' checker protocol (config_schema.Switch) and two defects of
    the code (the loader thread ending early, a wrong loaders.COPY_WAIT)."""
    bare = ('ValueError', 'FileNotFoundError', 'IsADirectoryError', 'NotADirectoryError',
            'RuntimeError', 'TypeError', 'KeyError')
    def called(node):  # the names a raise calls: E(...), (E if c else F)(...)
        func = node.exc.func if isinstance(node.exc, ast.Call) else None
        options = [func.body, func.orelse] if isinstance(func, ast.IfExp) else [func]
        return [f.id for f in options if isinstance(f, ast.Name)]
    raised = [f'{p.name} {name}' for p in PACKAGE for node in ast.walk(parse(p))
              if isinstance(node, ast.Raise) for name in called(node) if name in bare]
    assert sorted(raised) == ['config_schema.py ValueError', 'epoch_iterator.py RuntimeError',
                              'loaders.py ValueError'], raised


def test_imports_are_at_the_top_of_package_modules():
    late = set()
    for path in PACKAGE:
        for fn in functions(path):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    late |= {(path.name, alias.name) for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    late.add((path.name, node.module))
    assert late <= LATE_IMPORTS_ALLOWED, late - LATE_IMPORTS_ALLOWED


def test_optional_packages_are_imported_only_through_optional_require():
    for path in PACKAGE + ENTRY_SCRIPTS:
        for node in ast.walk(parse(path)):
            assert not [n for n in imported_modules(node)
                        if n.split('.')[0] in ('timm', 'wandb', 'tensorboard')
                        or n.startswith('torch.utils.tensorboard')], path.name


def test_package_modules_import_ffcv_import_before_ffcv():
    """A package module that imports ffcv (anywhere in it) imports ``ffcv_import`` (ffcv without
    the numba compiling that importing it sets off) at its top, above that line: whichever module
    a process imports first imports ffcv for the whole process (test_data.py checks what the
    import then does)."""
    using = []
    for path in PACKAGE:
        if path.name == 'ffcv_import.py':  # the module that imports ffcv for the others
            continue
        tree = parse(path)
        lines = [node.lineno for node in ast.walk(tree)
                 if any(n.split('.')[0] == 'ffcv' for n in imported_modules(node))]
        if lines:
            using.append(path.name)
            assert any(isinstance(node, ast.ImportFrom) and node.level == 1
                       and [a.name for a in node.names] == ['ffcv_import']
                       and node.lineno < min(lines) for node in tree.body), path.name
    assert {'decoders.py', 'loaders.py', 'verify.py', 'writer.py'} <= set(using)


def test_benchmarks_import_no_other_benchmark():
    """A benchmark imports benchmarks/common.py and the package, never another benchmark (at the
    top or inside a function)."""
    others = {p.stem for p in BENCHMARKS} - {'common'}
    found = []
    for path in BENCHMARKS:
        for node in ast.walk(parse(path)):
            found += [f'{path.name}:{node.lineno} imports {n}' for n in imported_modules(node)
                      if n.split('.')[0] in others]
    assert {p.stem for p in BENCHMARKS} >= {'common', 'bench_loader', 'bench_train'}
    assert found == []


def test_the_data_concerns_have_a_module_each():
    """Sources, classes, images, writer, verify, loaders, constants and files each have their
    module, and there is no catch-all ``data`` module; none imports the writer but the writer's
    users (the loaders and the engine reach the constants without it)."""
    names = {p.stem for p in PACKAGE}
    assert {'sources', 'classes', 'images', 'writer', 'verify', 'loaders', 'constants',
            'files'} <= names and 'data' not in names
    for module in ('loaders', 'engine', 'decoders', 'images', 'checkpoint'):
        source = (REPO / 'imagenet_ffcv' / f'{module}.py').read_text()
        assert 'from .writer' not in source and 'import writer' not in source, module


# Where config keys may be named in code: the config and its schema, and the two modules that read
# the config (the trainer and its validation); every other module takes plain arguments.
CONFIG_READERS = {'config.py', 'config_schema.py', 'config_warnings.py', 'preflight.py', 'train.py',
                  'evaluate.py'}
KEY = re.compile(r'\b(data|model|resolution|lr|logging|validation|training|checkpoint|dist)'
                 r'\.[a-z_]+(?![a-z_(])')


def string_constants(path: Path):
    """The string literals of a module that are not docstrings: ``(line, text)``."""
    tree = parse(path)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            yield node.lineno, node.value


def test_config_keys_are_named_only_where_the_config_is_read():
    named = [f'{p.name}:{line} {m.group(0)}' for p in PACKAGE if p.name not in CONFIG_READERS
             for line, text in string_constants(p) for m in KEY.finditer(text)
             if not m.group(0).endswith(('.pt', '.py', '.json', '.tsv', '.pkl'))]
    assert named == []


def test_each_choice_list_is_typed_in_its_home_only():
    """The decoder names, precisions, LR schedules and optimizers are typed once (constants.py,
    schedules.py, optimizers.py); everything else imports them. A list, tuple or set literal
    holding two or more of one list's names elsewhere is a second copy."""
    from imagenet_ffcv import constants, optimizers, schedules
    homes = {'constants.py': [constants.DECODERS, constants.PRECISIONS],
             'schedules.py': [tuple(schedules.LR_SCHEDULES)],
             'optimizers.py': [optimizers.OPTIMIZERS]}
    choices = [(home, set(names)) for home, lists in homes.items() for names in lists]
    copies = []
    for path in PACKAGE + sorted((REPO / 'benchmarks').glob('*.py')):
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                items = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                copies += [f'{path.name}:{node.lineno} {sorted(items & names)}'
                           for home, names in choices
                           if len(items & names) >= 2 and path.name != home]
    assert copies == []


def test_the_package_docstring_names_every_module():
    import imagenet_ffcv
    names = [p.stem for p in PACKAGE if not p.stem.startswith('_')]
    assert [n for n in names if f'``{n}``' not in imagenet_ffcv.__doc__] == []
