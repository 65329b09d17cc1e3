"""A restricted unpickler for dataset pickles (PEPLER/PETER ``reviews.pickle``).

Unpickling runs code: a pickle may name any importable callable and have it called. Datasets
come from strangers, so we load them with an unpickler that resolves no global except the
built-in container and scalar types a list of review dicts needs. Lists, dicts, tuples,
strings, numbers, booleans and None are encoded by pickle opcodes and need no global at all;
``set``/``frozenset``/``complex`` are rebuilt through their builtins (in old protocols).
Anything else, a function or a class, raises ``UnsafePickleError`` before it runs (this
includes ``bytes`` in protocol 0-2 pickles, which are rebuilt through ``_codecs.encode``).

Memory cap: nothing the unpickler builds is larger than a small multiple of the pickle's own
size. Every opcode builds from bytes present in the file, and no allowed global takes a size:
``bytearray`` is refused because ``bytearray(2**30)`` is a 28-byte pickle that allocates 1 GiB.
(Protocol 5's ``BYTEARRAY8`` opcode still works: it copies bytes that are in the file.)
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

_ALLOWED_NAMES = ("set", "frozenset", "complex")
_ALLOWED_GLOBALS = frozenset(
    (module, name) for module in ("builtins", "__builtin__") for name in _ALLOWED_NAMES
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a global (a function or class) that we refuse to resolve."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the builtins in ``_ALLOWED_GLOBALS``."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refused to load global '{module}.{name}': only built-in containers "
            "and scalars are allowed, because unpickling a function or class can run arbitrary "
            "code. Re-save the data as plain lists/dicts/strings/numbers."
        )


def restricted_loads(data: bytes, source: str = "<bytes>"):
    """Unpickle ``data`` allowing only built-in containers and scalars; ``source`` names it."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise pickle.UnpicklingError(f"{source}: not a readable pickle: {error}") from error


def restricted_load(path: str | Path):
    """Unpickle the file at ``path`` with ``restricted_loads``."""
    path = Path(path)
    return restricted_loads(path.read_bytes(), str(path))
