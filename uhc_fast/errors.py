"""What the library raises and warns, with the teacher, row and argument as fields.

Callers that map positions to their own names (the streaming layer turns a chunk row into a global
sample and a teacher index into its manifest name) read the fields; nobody parses messages.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the teacher, the row and/or the argument.

    Attributes:
        teacher: index of the offending teacher, or None.
        row: index of the offending row (sample) within the call, or None.
        argument: the offending argument's name, or None (``value``: its value as shown).
        detail: what is wrong, without the location.
    """

    def __init__(
        self,
        detail: str,
        *,
        teacher: int | None = None,
        row: int | None = None,
        argument: str | None = None,
        value: str | None = None,
    ):
        self.teacher, self.row, self.argument, self.value, self.detail = teacher, row, argument, value, detail
        super().__init__(self.message())

    def where(self, teacher_name: str | None = None, row_name: str = "row", row_offset: int = 0) -> str:
        """The location part of the message (``tol=0``, ``teacher 2 ('t2'), sample 17``)."""
        parts = []
        if self.argument is not None:
            parts.append(self.argument if self.value is None else f"{self.argument}={self.value}")
        if self.teacher is not None:
            parts.append(f"teacher {self.teacher}" + (f" ({teacher_name!r})" if teacher_name else ""))
        if self.row is not None:
            parts.append(f"{row_name} {self.row + row_offset}")
        return ", ".join(parts)

    def message(self, **where) -> str:
        location = self.where(**where)
        return f"{location}: {self.detail}" if location else self.detail


class DisconnectedClassesWarning(UserWarning):
    """The class-overlap graph has several components; the split of mass between them is set by
    the ``alpha`` prior rather than by the teachers."""


class UnidentifiableScalesWarning(UserWarning):
    """`mf-lu`: some teachers share fewer than two classes with the others, so the data cannot fix
    their scales relative to the rest; each such group's scale is held at that of its largest
    teacher (``v = 1``)."""
