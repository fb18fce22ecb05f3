"""The readers of ffcv 1.0.2's memory managers (``read(address, mem_state)``: a sample's bytes,
from the .beton in memory), which the loaders' decoders call for each image; :func:`install` puts
them in ffcv's two managers, and ``loaders.Loader`` does so, with the process cache's page
readers handing their errors on (:func:`_page_reader_run`).

ffcv compiles a new reader for each loader, and the decoders' batch loop, compiled once per process
for each reader it is given (``decoders.batch_decoder``), would then be compiled again with it: 4 s
per loader on 2 cores. These are compiled once per process.
"""
import numba
import numpy as np
from . import ffcv_import  # noqa: F401  (first: ffcv without its import-time compiling)
from ffcv.memory_managers import OSCacheManager, ProcessCacheManager
from ffcv.memory_managers.process_cache.page_reader import PageReader
from ffcv.memory_managers.process_cache.schedule import ScheduleExecutor
from ffcv.pipeline.compiler import Compiler

# ffcv's OSCacheManager (``os_cache=True``, our ``data.in_memory=1``) marks its arrays
# read-only by setting ``mutable = False`` on numba's shared (interned) ``uint8[::1]`` type object.
# That changes the hash of a type that numba's dictionaries already hold as a key, and numba then
# raises KeyError on them: "Exception ignored in: <finalize object ...>" from
# ``dispatcher.finalizer`` whenever a compiled function is collected, or a failed compile (in
# the loader's thread: ffcv's loader then hangs, ours raises it) in a function compiled before.
# Its state and reader, typed with a read-only array type of their own:
_READ_ONLY_BYTES = numba.types.Array(numba.uint8, 1, 'C', readonly=True)


def _os_cache_state_type(self):
    return numba.types.Tuple([_READ_ONLY_BYTES, numba.uint64[::1], numba.uint64[::1]])


def _os_cache_read(address, mem_state):
    size = mem_state[2][np.searchsorted(mem_state[1], address)]
    return mem_state[0][address:address + size]


def _process_cache_read(address, mem_state):
    # ffcv's ProcessCacheManager reader, with the page size taken from its pages array (slots,
    # page size) rather than frozen into each loader's reader
    size = mem_state[2][np.searchsorted(mem_state[1], address)]
    page_size = np.uint64(mem_state[0].shape[1])
    page = address // page_size
    offset = address - page * page_size
    return mem_state[0][mem_state[3][page], offset:offset + size]


_readers = {}  # memory manager class -> its reader, compiled


def _compile_reader(self):
    """A memory manager's ``compile_reader``: one reader per process for each of ffcv's two
    managers."""
    kind = type(self)
    if kind not in _readers:
        if isinstance(self, OSCacheManager):
            _readers[kind] = Compiler.compile(
                _os_cache_read, _READ_ONLY_BYTES(numba.uint64, self.state_type))
        else:  # a ProcessCacheManager (install puts this method in those two only)
            _readers[kind] = Compiler.compile(_process_cache_read)
    return _readers[kind]


_ffcv_page_reader_run = PageReader.run


def _page_reader_run(self) -> None:
    """ffcv's ``PageReader.run`` (a thread of the process cache, ``data.in_memory=0``: it opens
    the .beton as each epoch starts and reads the pages asked for), handing an error on to the
    loader (:func:`_load_batch`) instead of dying with it: the loader then waited for ever for
    its pages (a .beton deleted or unreadable by then)."""
    try:
        _ffcv_page_reader_run(self)
    except Exception as e:  # noqa: BLE001 - raised in the loader's thread by _load_batch
        self.loaded.put(e)


def _load_batch(self, current_batch: int) -> None:
    """ffcv's ``ScheduleExecutor.load_batch`` (ask for the pages the schedule lets it prefetch,
    wait for those the batch needs), raising what a page reader handed on."""
    assert current_batch == self.next_batch
    for page in self.schedule.can_prefetch_at[current_batch]:
        self.queries.put((page, self.schedule.page_to_slot[page]))
    for page in self.schedule.entering_at[current_batch]:
        while page not in self.loaded:
            loaded = self.loaded_queue.get()
            if isinstance(loaded, Exception):
                raise loaded
            self.loaded.add(loaded)
    self.next_batch = current_batch + 1


def install() -> None:
    """Put the state type and readers above in ffcv's memory managers, and the page readers that
    hand their errors on in its process cache (done when a loader is made)."""
    OSCacheManager.state_type = property(_os_cache_state_type)
    OSCacheManager.compile_reader = _compile_reader
    ProcessCacheManager.compile_reader = _compile_reader
    PageReader.run = _page_reader_run
    ScheduleExecutor.load_batch = _load_batch
